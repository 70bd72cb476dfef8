#!/usr/bin/env bash
# The shipped recipe per family at its real architecture, six arms (recipes/family_runs.py), on the device.
#
#   bash tests/gpu/family_recipes.sh --family gemma2-2b --arms stock,use_cce --steps 200 --arm-timeout 270
#   bash tests/gpu/family_recipes.sh --family phi3.5-mini --full-only --arms stock --steps 200 --arm-timeout 540
#   PYTHON=.venv/bin/python bash tests/gpu/family_recipes.sh --dry-run --family qwen2.5-7b     # CPU plumbing
#
# The largest per-device batch at the YAML's length (issue 22's last row; family_runs.py's doc says what is
# measured), one arm per call (a 10-minute call holds ~9 candidates of Gemma 2 2B):
#   bash tests/gpu/family_recipes.sh --family gemma2-2b --max-batch --arms stock --max-batch-timeout 240
#   bash tests/gpu/family_recipes.sh --family gemma2-2b --max-batch --arms use_cce --max-batch-timeout 240 \
#        --max-batch-tolerance 0.125
#   PYTHON=.venv/bin/python bash tests/gpu/family_recipes.sh --dry-run --max-batch --family gemma2-2b --max-batch-limit 2
# It writes <family>/max_batch.jsonl (one line per candidate as it ends) and the <family>.json / .md with a
# "largest per-device batch" table; merge the calls locally with recipes/family_report.py CALL1_DIR CALL2_DIR.
# MAX_BATCH=1 adds --max-batch to the arguments (for a caller that passes the rest unchanged).
#
# Arguments go to recipes/family_runs.py (its --help lists them). Needs, carried: .gpu_data/ (alpaca_5000.json and
# tokenizers/{qwen2.5,llama3.1,phi3-mini}: TOKENIZERS="qwen2.5 llama3.1 phi3-mini" bash tests/gpu/fetch_wheels.sh)
# and .whl/ (liger-kernel, for the two Liger arms; the image has accelerate, peft and matplotlib).
#
# What comes back from $OUT (the device returns at most 8 files, 2 folders down): run.log, <family>/meta.json,
# <family>/<arm>.steps.jsonl per arm (one line per step, written as it ends: a killed call keeps its rows), and
# <family>.json / .md / .png (rewritten after each arm). So at most 3 arms per call. One command runs at most
# 10 minutes: give --arm-timeout so the last arm ends ~40 s before (a cut arm is reported with the steps it has).
# Merge the calls of one family locally: python recipes/family_report.py CALL1_DIR CALL2_DIR ... (all arms of a
# family on the same machine kind and session: compare timings only there).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/outputs/families}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/run.log") 2>&1
# shellcheck source=tests/gpu/lib.sh
source tests/gpu/lib.sh
compgen -G ".whl/*.whl" >/dev/null && install_wheels .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
print_versions torch triton transformers accelerate peft liger_kernel matplotlib cce_patch
"$PY" recipes/family_runs.py --out "$OUT" ${MAX_BATCH:+--max-batch} "$@"
