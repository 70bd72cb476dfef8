#!/usr/bin/env bash
# Fetch, on a machine WITH network, the wheels the GPU image lacks, into .whl/ (git-ignored), and copy the
# shared benchmark/fine-tune data into .gpu_data/ (git-ignored). Both travel to the device with `carry`.
#
#   bash tests/gpu/fetch_wheels.sh            # datasets (+ dill, multiprocess), cut-cross-entropy, liger-kernel, trl;
#                                             # deepspeed for the 2-GPU run in .whl-deepspeed/ (WITH_DEEPSPEED=0: not)
#   WITH_PYARROW=1 bash tests/gpu/fetch_wheels.sh   # also carry pyarrow 24 (47 MiB!), only the qwen2.5 tokenizer
#
# datasets 5.2 declares pyarrow>=24; the image's pyarrow version is not recorded in KINDS.md. run_all.sh prints
# it and whether `import datasets` works; carry pyarrow (WITH_PYARROW=1) only if it does not.
#
# Why these: the GPU image (torch 2.11, transformers 5.17, see /work/.library/device/KINDS.md) has pyarrow,
# pandas, xxhash, fsspec, requests, huggingface_hub, ... but not `datasets`, nor its `dill` / `multiprocess`;
# apple's `cut-cross-entropy` and `liger-kernel` are the peers the benchmark compares against, and `trl` (1.16, pure
# Python) holds TRL's fused LM head kernel (the `trl` bench method) and the trainers of tests/gpu/test_trl_gpu.py.
# Wheels are pure-Python except pyarrow; all are fetched for CPython 3.12 manylinux x86_64 with --no-deps so
# nothing already in the image (torch!) is pulled in. The whole working tree + carried folders must stay under
# 64 MiB per device call: the script prints the sizes.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

PY=${PYTHON:-python3}
WHL=.whl
DATA=.gpu_data
SHARED=${CCE_SHARED_DATA:-../shared/data}

# Pinned versions: known to work with torch 2.11 / triton 3.6 / huggingface_hub 1.x.
DATASETS_VER=${DATASETS_VER:-5.2.0}
DILL_VER=${DILL_VER:-0.4.0}
MULTIPROCESS_VER=${MULTIPROCESS_VER:-0.70.18}
CCE_VER=${CCE_VER:-25.1.1}
LIGER_VER=${LIGER_VER:-0.8.5}
TRL_VER=${TRL_VER:-1.16.0}
PYARROW_VER=${PYARROW_VER:-24.0.0}
if [[ "${WITH_PYARROW:-0}" == 1 ]]; then
  TOKENIZERS=${TOKENIZERS:-qwen2.5}          # pyarrow alone is 47 MiB: keep the carried total under 64 MiB
else
  TOKENIZERS=${TOKENIZERS:-qwen2.5 llama3.1}
fi

rm -rf "$WHL"
mkdir -p "$WHL"
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "${WHL_DIR:-$WHL}" "$@"
}
download "datasets==$DATASETS_VER" "dill==$DILL_VER" "multiprocess==$MULTIPROCESS_VER"
download "cut-cross-entropy==$CCE_VER"
download "liger-kernel==$LIGER_VER"
download "trl==$TRL_VER"
if [[ "${WITH_PYARROW:-0}" == 1 ]]; then
  download "pyarrow==$PYARROW_VER"
fi
# DeepSpeed for the ZeRO runs of tests/gpu/multi_gpu.sh, in its own folder (run_all.sh does not install it). PyPI
# has only its sdist: built here without its CUDA ops (DS_BUILD_OPS=0; the ZeRO configs use torch's optimizer, so
# nothing is compiled on the device). The image has einops, msgpack, ninja, nvidia-ml-py, psutil and py-cpuinfo
# (/work/.library/device/KINDS.md), not hjson or pydantic.
DS_WHL=.whl-deepspeed
rm -rf "$DS_WHL"
if [[ "${WITH_DEEPSPEED:-1}" == 1 ]]; then
  mkdir -p "$DS_WHL"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==${DEEPSPEED_VER:-0.19.8}" -w "$DS_WHL"
  WHL_DIR=$DS_WHL download hjson
  # pydantic pins pydantic-core exactly: resolved together (with annotated-types, typing-inspection and
  # typing-extensions), not each at its newest
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DS_WHL" "pydantic>=2,<3"
fi

echo "== Requires-Dist of the carried wheels (check each against the image's package list) =="
for w in "$WHL"/*.whl; do
  echo "-- $(basename "$w")"
  "$PY" - "$w" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        print("   ", line.split(":", 1)[1].strip())
PYEOF
done

# Shared data for the GPU benchmarks / fine-tune (never committed: .gpu_data/ is git-ignored).
if [[ -d "$SHARED" ]]; then
  rm -rf "$DATA"
  mkdir -p "$DATA/tokenizers"
  cp "$SHARED/alpaca_5000.json" "$DATA/"
  # The anchor input generator, so the GPU test can check ours against it bit for bit (tests/test_bench.py).
  REF=${SHARED%/data}/reference/regimes.py
  if [[ -f "$REF" ]]; then mkdir -p "$DATA/reference" && cp "$REF" "$DATA/reference/"; fi
  for tok in $TOKENIZERS; do
    [[ -d "$SHARED/tokenizers/$tok" ]] && cp -r "$SHARED/tokenizers/$tok" "$DATA/tokenizers/"
  done
else
  echo "warning: $SHARED not found: .gpu_data/ not refreshed" >&2
fi

echo "== sizes =="
du -sh "$WHL" "$DS_WHL" "$DATA" 2>/dev/null || true
ls -la "$WHL"
tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry_kb=$(du -sk "$WHL" "$DS_WHL" "$DATA" 2>/dev/null | awk '{s+=$1} END {print s}')
total_mb=$(( (tree_kb + carry_kb) / 1024 ))
echo "working tree ${tree_kb} KiB + carried ${carry_kb} KiB = ~${total_mb} MiB (limit 64 MiB per device call)"
if (( total_mb >= 64 )); then
  echo "ERROR: over the 64 MiB device limit: carry less (e.g. WITH_PYARROW=0, or only one tokenizer)" >&2
  exit 1
fi
