#!/usr/bin/env bash
# Everything the project verifies and measures on a CUDA machine, in sections that fit one device call each.
#
#   bash tests/gpu/run_all.sh                                  # every default section
#   CCE_GPU_STEPS="tests bench" bash tests/gpu/run_all.sh      # a subset (split the work over ≤10-minute calls)
#
# Run from the repository root (any cwd works). Outputs go to $OUT (default ./outputs/gpu), at most 8 files,
# because the device tool returns at most 8:
#   run_all.log            everything printed (versions, nvidia-smi, pytest, every table), appended per call
#   paper.json paper.png   kernel benchmark at N=8192 D=2304 V=256000, regimes flat/peaked/lm, all methods
#   families.json          the five families' head shapes at N=8192 (lm regime); plot it locally with
#                          `python -m cce_patch.bench.report families.json`
#   scaling.json scaling.png   N = 1k..64k (only when the `scaling` section is asked for)
#   dtypes.json            fp16, fp32+TF32 and IEEE fp32 at the paper shape, lm (only when `dtypes` is asked for; it
#                          replaces one of the files above in a call that already returns 8)
#   e2e.json               Gemma-2-2B and Llama-3.2-1B training step, stock vs patched
#   finetune_state.json    the GPU fine-tune's trainer_state.json (loss curve)
#   ab.json                interleaved A/B timings (only when `ab` is asked for: tests/gpu/ab_compare.py)
#   filter_bench.json/.png     issue 23: filter_eps vs exact at the paper shape, three regimes (section `filter`)
#   filter_trained.json/.png   the same on a briefly trained Qwen2.5-0.5B's own logits (section `filter_trained`)
#   filter_curves.json/.png    the Alpaca recipe's loss with the filter off and on, 300 steps (section `filter_curves`)
#
# Sections (CCE_GPU_STEPS, default "tests bench families e2e finetune"; add "scaling" / "dtypes" / "ab" / "profile"
# / "liger" / "e2e_loop" / "filter" / "filter_trained" / "filter_curves" explicitly; the per-family recipe runs are
# tests/gpu/family_recipes.sh) and their
# expected wall time on one H100: tests ~3-5 min, bench ~4 min, families ~6-8 min, scaling ~6 min,
# dtypes ~3 min, e2e ~2 min, finetune: whatever the config's max_steps says (a few hundred steps of a 0.5B-2B model: ~3-6 min),
# filter ~3 min, filter_trained ~4 min (2.5 min of training), filter_curves ~5 min (three 300-step runs of ~90 s on an H100).
# Each section has its own time limit (CCE_TIMEOUT_<SECTION> seconds) so one hang cannot eat the call.
# Knobs: CCE_BENCH_METHODS (e.g. "ours,ours[mode=speed],torch,torch.compile,cce,cce_exact,liger"),
# CCE_BENCH_ARGS (appended to every kernel-bench command), CCE_SCALING_METHODS, CCE_E2E_MODELS, CCE_E2E_ARGS,
# CCE_FAMILIES, CCE_FT_CONFIG, CCE_FT_ACCELERATE, CCE_FT_ARGS, CCE_NATIVE_TESTS (the CPU-suite files the tests
# section also runs natively), CCE_AB_ARGS (ab_compare.py's arguments), CCE_PROFILE_ARGS (profile_modes.py's),
# CCE_FILTER_ARGS (filter_bench's), CCE_FILTER_TRAINED_ARGS (filter_trained's, replacing "--minutes 2.5"),
# CCE_FILTER_CURVES_ARGS (recipes/filter_curves.py's, e.g. "--steps 200").
# A CPU dry run of the plumbing (seconds):
#   PYTHON=.venv/bin/python CCE_GPU_STEPS="bench e2e" CCE_BENCH_ARGS="--preset tiny --device cpu" \
#     CCE_E2E_MODELS=tiny-llama CCE_E2E_ARGS="--batch 1 --seq 32" bash tests/gpu/run_all.sh
#
# Wheels the image lacks (datasets, apple's cut-cross-entropy, liger-kernel) travel in .whl/ and data in
# .gpu_data/: make both with tests/gpu/fetch_wheels.sh and name them in the device call's `carry`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/outputs/gpu}
mkdir -p "$OUT"
STEPS=${CCE_GPU_STEPS:-tests bench families e2e finetune}
SCRATCH=${CCE_SCRATCH:-/tmp/cce_gpu}
mkdir -p "$SCRATCH"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/run_all.log") 2>&1
# shellcheck source=tests/gpu/lib.sh
source tests/gpu/lib.sh
declare -A RESULT

# --- environment: carried wheels, the project on the path, versions ------------------------------------
hr "environment (sections: $STEPS)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  install_wheels .whl/*.whl
else
  echo "no .whl/ carried: peers (apple CCE, Liger) and datasets are skipped where missing"
fi
nvidia-smi || echo "WARNING: nvidia-smi failed"
print_versions torch triton transformers accelerate peft datasets pyarrow fsspec cut_cross_entropy liger_kernel \
  trl deepspeed matplotlib cce_patch
"$PY" - <<'EOF'
import platform
print("python", platform.python_version())
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"torch.version.cuda {torch.version.cuda}")
else:
    print("WARNING: torch sees no CUDA device")
EOF

# --- tests: every GPU-marked test (kernels vs fp32 reference, regimes vs the anchor generator, ...), then the
# op and model tests that CI runs under Triton's interpreter, here natively (compiled kernels, real tiles)
gpu_tests() {
  "$PY" -m pytest -m gpu tests -q -ra --continue-on-collection-errors -p no:cacheprovider || return $?
  # shellcheck disable=SC2086  # a list of files on purpose
  "$PY" -m pytest -q -ra -p no:cacheprovider ${CCE_NATIVE_TESTS:-tests/test_ops_speed.py tests/test_ops_triton.py tests/test_models_patch.py tests/test_filter_triton.py tests/test_memory_filter_triton.py tests/test_ops_validation.py}
}
if want tests; then
  export -f gpu_tests
  export PY CCE_NATIVE_TESTS
  run_section tests "${CCE_TIMEOUT_TESTS:-540}" bash -c gpu_tests
fi

# --- bench: the paper shape, three regimes, ours + torch + torch.compile + peers -------------------------
BENCH_ARGS=(--out "$SCRATCH/bench" --no-png)
if want bench; then
  run_section bench "${CCE_TIMEOUT_BENCH:-540}" \
    "$PY" -m cce_patch.bench --preset paper --name paper --out "$SCRATCH/bench" \
    ${CCE_BENCH_METHODS:+--methods "$CCE_BENCH_METHODS"} ${CCE_BENCH_ARGS:-}
  keep "$SCRATCH/bench/paper.json" "$SCRATCH/bench/paper.png"
fi

# --- families: the five families' lm-head shapes at N=8192 --------------------------------------------
# ~1.5 min a shape (torch.compile recompiles per shape). To split it over two calls:
#   CCE_FAMILIES=gemma2-2b,qwen2.5-7b,phi3.5-mini  then  CCE_FAMILIES=mistral-nemo-12b,llama3.1-8b
# and merge locally: python -m cce_patch.bench.report A/families.json B/families.json --out X --name families
if want families; then
  run_section families "${CCE_TIMEOUT_FAMILIES:-560}" \
    "$PY" -m cce_patch.bench --preset families --name families "${BENCH_ARGS[@]}" \
    ${CCE_FAMILIES:+--families "$CCE_FAMILIES"} \
    ${CCE_BENCH_METHODS:+--methods "$CCE_BENCH_METHODS"} ${CCE_BENCH_ARGS:-}
  keep "$SCRATCH/bench/families.json"
fi

# --- scaling: N from 1k to 64k (opt-in) -------------------------------------------------------------------
# torch.compile recompiles for each of the 7 sizes (most of the ~6 min); Liger is left out by default (it is
# ~1 s a call at 64k); add it with CCE_SCALING_METHODS if wanted.
if want scaling; then
  run_section scaling "${CCE_TIMEOUT_SCALING:-560}" \
    "$PY" -m cce_patch.bench --preset scaling --name scaling --no-errors --out "$SCRATCH/bench" --rep-ms 200 \
    --methods "${CCE_SCALING_METHODS:-gemm,torch,torch.compile,ours,ours[mode=speed],cce}" ${CCE_BENCH_ARGS:-}
  keep "$SCRATCH/bench/scaling.json" "$SCRATCH/bench/scaling.png"
fi

# --- dtypes: fp16, fp32 with TF32 opted in, IEEE fp32 (opt-in section) --------------------------------------
# Paper shape, lm regime. IEEE fp32 (torch's default) runs on cuBLAS SGEMM (impl="auto"), ~0.6-0.8 s a fwd+bwd:
# ~2 min with few repetitions. Pick with CCE_DTYPES (default "fp16 fp32-tf32 fp32"). One merged dtypes.json.
if want dtypes; then
  DT_JSONS=()
  for dt in ${CCE_DTYPES:-fp16 fp32-tf32 fp32}; do
    case $dt in
      fp16) args=(--dtype fp16 --methods "ours,torch,torch.compile") ;;  # speed mode refuses fp16
      fp32-tf32) args=(--dtype fp32 --tf32 --methods "ours,ours[mode=speed],torch,torch.compile") ;;
      fp32) args=(--dtype fp32 --methods "ours,ours[mode=speed],torch" --rep-ms 50) ;;
      *) echo "unknown dtype run $dt"; continue ;;
    esac
    run_section "dtypes-$dt" "${CCE_TIMEOUT_DTYPES:-300}" \
      "$PY" -m cce_patch.bench --regimes lm --name "dtype_$dt" --out "$SCRATCH/bench" --no-png "${args[@]}" \
      ${CCE_BENCH_ARGS:-}
    [[ -f "$SCRATCH/bench/dtype_$dt.json" ]] && DT_JSONS+=("$SCRATCH/bench/dtype_$dt.json")
  done
  if (( ${#DT_JSONS[@]} )); then
    "$PY" -m cce_patch.bench.report "${DT_JSONS[@]}" --out "$SCRATCH/dtypes" --name dtypes >/dev/null \
      && keep "$SCRATCH/dtypes/dtypes.json"
  fi
  dt_status=rc=0
  for dt in ${CCE_DTYPES:-fp16 fp32-tf32 fp32}; do
    [[ ${RESULT[dtypes-$dt]:-not run} == rc=0* ]] || dt_status=failed
  done
  RESULT[dtypes]="$dt_status ($(for dt in ${CCE_DTYPES:-fp16 fp32-tf32 fp32}; do printf '%s: %s; ' "$dt" "${RESULT[dtypes-$dt]:-not run}"; done))"
fi

# --- ab: interleaved A/B timing of source trees / tuning constants (opt-in; see tests/gpu/ab_compare.py) --------
if want ab; then
  # shellcheck disable=SC2086  # CCE_AB_ARGS is a list of words on purpose
  run_section ab "${CCE_TIMEOUT_AB:-400}" "$PY" tests/gpu/ab_compare.py --json "$OUT/ab.json" \
    ${CCE_AB_ARGS:---variant new=.}
fi

# --- profile: where each mode's time goes (opt-in; see tests/gpu/profile_modes.py for its options) ---------
if want profile; then
  # shellcheck disable=SC2086
  run_section profile "${CCE_TIMEOUT_PROFILE:-400}" "$PY" tests/gpu/profile_modes.py ${CCE_PROFILE_ARGS:-}
fi

# --- liger: Liger-Kernel with our loss (opt-in): the Trainer's use_cce + use_liger_kernel against stock, and what
# patch() over Liger's defaults runs (tests/gpu/test_liger_compose.py; needs liger-kernel from .whl/) ------------
if want liger; then
  run_section liger "${CCE_TIMEOUT_LIGER:-300}" \
    "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu/test_liger_compose.py tests/test_trainer_liger.py
fi

# --- e2e_loop: `cce-patch e2e` in the Trainer-loop mode, eager and torch.compile, with Liger (opt-in) ------------
# CCE_E2E_LOOP_ARGS replaces the defaults (Gemma 2 2B, 8 arms: 4 variants eager and compiled, 40 AdamW steps of 16
# sequences of 32-512 tokens each; expect 6-9 min on one H100; split with --variants if it runs long).
if want e2e_loop; then
  # shellcheck disable=SC2086
  run_section e2e_loop "${CCE_TIMEOUT_E2E_LOOP:-560}" \
    "$PY" -m cce_patch.bench.e2e --out "$SCRATCH/e2e" --name e2e_loop --no-png \
    ${CCE_E2E_LOOP_ARGS:---model gemma2-2b --with-liger-kernels --compile both --loop-steps 40 --steps 2 --warmup 1}
  keep "$SCRATCH/e2e/e2e_loop.json" "$SCRATCH/e2e/e2e_loop.md"
fi

# --- e2e: a training step of real architectures, stock vs patched ----------------------------------------
if want e2e; then
  E2E_MODELS=()
  for m in ${CCE_E2E_MODELS:-gemma2-2b llama3.2-1b}; do E2E_MODELS+=(--model "$m"); done
  run_section e2e "${CCE_TIMEOUT_E2E:-400}" \
    "$PY" -m cce_patch.bench.e2e "${E2E_MODELS[@]}" --out "$SCRATCH/e2e" ${CCE_E2E_ARGS:-}
  keep "$SCRATCH/e2e/e2e.json"
fi

# --- finetune: the Trainer recipe through accelerate on the real Alpaca sample ---------------------------
# The GPU config is the training recipe's (docs/training.md). CCE_FT_CONFIG names it; otherwise the first
# configs/*gpu*.yaml. Extra recipe arguments: CCE_FT_ARGS (default: the carried Alpaca sample).
if want finetune; then
  FT_CONFIG=${CCE_FT_CONFIG:-$(ls configs/*gpu*.yaml 2>/dev/null | head -1)}
  FT_ACCEL=${CCE_FT_ACCELERATE:-configs/accelerate/single-gpu.yaml}
  FT_DIR=$SCRATCH/finetune
  if [[ -z "$FT_CONFIG" || ! -f "$FT_CONFIG" ]]; then
    hr finetune
    echo "SKIPPED: no GPU fine-tune config (set CCE_FT_CONFIG=configs/<file>.yaml; see docs/training.md)"
    RESULT[finetune]="skipped: no config"
  elif [[ ! -f recipes/finetune_alpaca.py ]]; then
    hr finetune
    echo "SKIPPED: recipes/finetune_alpaca.py not present"
    RESULT[finetune]="skipped: no recipe"
  else
    if [[ ! -f .gpu_data/alpaca_5000.json ]]; then
      echo "WARNING: .gpu_data/alpaca_5000.json missing (run tests/gpu/fetch_wheels.sh and carry .gpu_data)"
    fi
    ACCEL_ARGS=(--num_processes 1)
    [[ -f "$FT_ACCEL" ]] && ACCEL_ARGS=(--config_file "$FT_ACCEL")
    rm -rf "$FT_DIR"
    # shellcheck disable=SC2086  # CCE_FT_ARGS is a list of words on purpose
    run_section finetune "${CCE_TIMEOUT_FINETUNE:-560}" \
      "$PY" -m accelerate.commands.launch "${ACCEL_ARGS[@]}" recipes/finetune_alpaca.py "$FT_CONFIG" \
      ${CCE_FT_ARGS:---dataset_path .gpu_data/alpaca_5000.json --output_dir $FT_DIR}
    state=$(ls -t "$FT_DIR"/trainer_state.json "$FT_DIR"/checkpoint-*/trainer_state.json 2>/dev/null | head -1)
    if [[ -n "$state" ]]; then
      cp "$state" "$OUT/finetune_state.json"
      "$PY" - "$OUT/finetune_state.json" <<'EOF'
import json, sys
logs = [h for h in json.load(open(sys.argv[1]))["log_history"] if "loss" in h]
if logs:
    k = max(1, len(logs) // 10)
    print("finetune loss: " + " -> ".join(f"{h['loss']:.3f}@{h.get('step')}" for h in logs[::k] + logs[-1:]))
EOF
    fi
  fi
fi

# === issue 23: gradient filtering (filter_eps) against exact gradients (opt-in) ================================
# filter          python -m cce_patch.bench.filter_bench: paper shape N=8192 D=2304 V=256000 bf16, flat/peaked/lm; exact
#                 ours (auto/speed/memory), torch.compile, apple's cce (from .whl/), ours with filter_eps 2^-12 (mode
#                 auto) in both vocabulary orders (mean_logit, natural: whether the order pays, BENCHMARKS.md): fwd+bwd
#                 ms, peak MB, dE/dC error vs fp32, tiles skipped, the backend that ran (~3 min on an H100).
#                 The JSON is rewritten after every cell, so a timed-out run keeps its rows.
# filter_trained  python -m cce_patch.bench.filter_trained: Qwen2.5-0.5B architecture, random init, trained 2.5 min on
#                 .gpu_data/alpaca_5000.json (Qwen2.5 tokenizer), then the same cells on 8192 held-out response tokens'
#                 hidden states and its head (regime trained-qwen2.5-0.5b-<steps>steps).
# filter_curves   recipes/filter_curves.py: configs/gpu-smoke-qwen2.5.yaml for 300 steps, filter off then
#                 filter_eps=2^-12, then Transformers' own loss as the noise baseline (same seed and data), per-step
#                 |loss difference| of each against filter off, the logged skipped fraction and each run's median
#                 step time. Each run is stopped after CCE_FILTER_CURVES_RUN_LIMIT_S (160) seconds; the report then
#                 covers the steps all ran (rc=3: partial).
# CPU dry run (a few minutes): PYTHON=<venv>/bin/python CCE_GPU_STEPS="filter filter_trained filter_curves" \
#   CCE_FILTER_ARGS="--device cpu --regimes lm" CCE_FILTER_TRAINED_ARGS="--device cpu --arch tiny-llama \
#   --tokenizer ../shared/data/tokenizers/phi3-mini --data ../shared/data/alpaca_5000.json --steps 3 --batch 4 \
#   --max-length 128 --holdout 16 --max-rows 200 --n 256 --eps 2^-10 --filter-modes speed" \
#   CCE_FILTER_CURVES_ARGS="--config configs/offline-tiny.yaml --steps 5 -- --sample_answers 0" bash tests/gpu/run_all.sh
if want filter || want filter_trained || want filter_curves; then
  [[ -f .gpu_data/alpaca_5000.json ]] || echo "NOTE: .gpu_data/alpaca_5000.json missing: filter_trained/filter_curves need it (carry .gpu_data)"
fi
if want filter; then
  # shellcheck disable=SC2086  # CCE_FILTER_ARGS is a list of words on purpose
  run_section filter "${CCE_TIMEOUT_FILTER:-360}" \
    "$PY" -m cce_patch.bench.filter_bench --out "$SCRATCH/filter" --name filter_bench \
    ${CCE_FILTER_ARGS:---eps 2^-12 --filter-modes auto,memory --vocab-order mean_logit,natural --rep-ms 25 --warmup-ms 10}
  keep "$SCRATCH/filter/filter_bench.json" "$SCRATCH/filter/filter_bench.png"
fi
if want filter_trained; then
  # shellcheck disable=SC2086  # CCE_FILTER_TRAINED_ARGS is a list of words on purpose
  run_section filter_trained "${CCE_TIMEOUT_FILTER_TRAINED:-420}" \
    "$PY" -m cce_patch.bench.filter_trained --out "$SCRATCH/filter" --name filter_trained \
    ${CCE_FILTER_TRAINED_ARGS:---minutes 2.5}
  keep "$SCRATCH/filter/filter_trained.json" "$SCRATCH/filter/filter_trained.png"
fi
if want filter_curves; then
  rm -rf "$SCRATCH/filter_curves" "$SCRATCH/filter_curves_runs"
  # shellcheck disable=SC2086  # CCE_FILTER_CURVES_ARGS is a list of words on purpose
  run_section filter_curves "${CCE_TIMEOUT_FILTER_CURVES:-540}" \
    "$PY" recipes/filter_curves.py --python "$PY" --out "$SCRATCH/filter_curves" \
    --scratch "$SCRATCH/filter_curves_runs" --run-limit-s "${CCE_FILTER_CURVES_RUN_LIMIT_S:-160}" \
    ${CCE_FILTER_CURVES_ARGS:-}
  keep "$SCRATCH/filter_curves/filter_curves.json" "$SCRATCH/filter_curves/filter_curves.png"
fi
# === end of issue 23 ============================================================================================

# === issue 16 (fastest by default): auto mode and the Liger-Kernel composition (opt-in) ======================
# auto       tests/gpu/auto_mode.py: memory vs speed vs auto fwd+bwd (N = 256..64k on the Gemma 2 head, the five
#            family heads at N=8192, the Trainer's call at Qwen2.5-0.5B's head for 16 x 128..512 tokens, ~5 GB free,
#            Phi 3.5 tile/chunk candidates), then a Qwen2.5-0.5B training step at 16 x 512 in each mode. ~3 min.
#            -> auto_mode.json, auto_mode.png, e2e_qwen_modes.json. CCE_AUTO_ARGS replaces the sweep's arguments,
#            CCE_AUTO_E2E_ARGS the step's (model, batch, seq, steps).
# e2e-liger  tests/gpu/test_liger_compose.py (Liger's kernels + our loss == stock), then cce-patch e2e with
#            --with-liger-kernels --max-tokens on Gemma-2-2B and Llama-3.1-8B (stock, ours, liger, ours+liger; step
#            at 4 x 2048, largest tokens per step up to 131072). ~3.5 min. -> e2e_liger.json, e2e_liger.png.
#            CCE_E2E_LIGER_MODELS / CCE_E2E_LIGER_ARGS change the models / the rest of the arguments.
# CPU dry run of both (a minute): PYTHON=<venv>/bin/python CCE_GPU_STEPS="auto e2e-liger" \
#   CCE_AUTO_ARGS="--tiny --device cpu --sections ns,trainer" CCE_AUTO_E2E_ARGS="--model tiny-llama --batch 2 --seq 16 --steps 1 --warmup 0" \
#   CCE_E2E_LIGER_MODELS=tiny-gemma2 CCE_E2E_LIGER_ARGS="--batch 1 --seq 16 --steps 1 --warmup 0 --max-tokens --max-tokens-cap 64" \
#   bash tests/gpu/run_all.sh
if want auto; then
  # shellcheck disable=SC2086  # CCE_AUTO_ARGS is a list of words on purpose
  run_section auto "${CCE_TIMEOUT_AUTO:-330}" "$PY" tests/gpu/auto_mode.py --out "$SCRATCH/auto" ${CCE_AUTO_ARGS:-}
  keep "$SCRATCH/auto/auto_mode.json" "$SCRATCH/auto/auto_mode.png"
  # shellcheck disable=SC2086  # CCE_AUTO_E2E_ARGS is a list of words on purpose
  run_section auto-e2e "${CCE_TIMEOUT_AUTO_E2E:-150}" "$PY" -m cce_patch.bench.e2e \
    --variants 'ours[mode=memory],ours[mode=speed],ours' --out "$SCRATCH/auto" --name e2e_qwen_modes --no-png \
    ${CCE_AUTO_E2E_ARGS:---model qwen2.5-0.5b --batch 16 --seq 512 --steps 8 --warmup 2}
  keep "$SCRATCH/auto/e2e_qwen_modes.json"
  if [[ ${RESULT[auto]} != rc=0* || ${RESULT[auto-e2e]} != rc=0* ]]; then
    RESULT[auto]="failed (sweep: ${RESULT[auto]}; e2e: ${RESULT[auto-e2e]})"
  fi
fi
if want e2e-liger; then
  run_section e2e-liger-test "${CCE_TIMEOUT_LIGER_TEST:-150}" \
    "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu/test_liger_compose.py
  LIGER_MODELS=()
  for m in ${CCE_E2E_LIGER_MODELS:-gemma2-2b llama3.1-8b}; do LIGER_MODELS+=(--model "$m"); done
  # shellcheck disable=SC2086  # CCE_E2E_LIGER_ARGS is a list of words on purpose
  run_section e2e-liger "${CCE_TIMEOUT_E2E_LIGER:-330}" \
    "$PY" -m cce_patch.bench.e2e "${LIGER_MODELS[@]}" --with-liger-kernels --out "$SCRATCH/e2e_liger" --name e2e_liger \
    ${CCE_E2E_LIGER_ARGS:---batch 4 --seq 2048 --steps 3 --warmup 1 --max-tokens --max-tokens-cap 131072 --max-tokens-budget-s 25}
  keep "$SCRATCH/e2e_liger/e2e_liger.json" "$SCRATCH/e2e_liger/e2e_liger.png"
  if [[ ${RESULT[e2e-liger]} != rc=0* || ${RESULT[e2e-liger-test]} != rc=0* ]]; then
    RESULT[e2e-liger]="failed (e2e: ${RESULT[e2e-liger]}; test: ${RESULT[e2e-liger-test]})"
  fi
fi
# === end of issue 16 ============================================================================================

# --- summary -------------------------------------------------------------------------------------------
hr summary
status=0
for s in $STEPS; do
  r=${RESULT[$s]:-not run}
  echo "$s: $r"
  [[ $r == rc=0* || $r == skipped* ]] || status=1
done
echo "files in $OUT:"
ls -la "$OUT"
n=$(find "$OUT" -type f | wc -l)
if ((n > 8)); then echo "WARNING: $n files under \$OUT; the device tool returns at most 8"; fi
exit $status
