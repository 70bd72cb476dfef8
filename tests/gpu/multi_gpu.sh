#!/usr/bin/env bash
# The 2-GPU run (issue 17): DDP, FSDP2, ZeRO-3 and vocab-parallel CCE on the GPUs of one host, through the same
# workers the CPU suite uses (tests/distributed_cases.py on NCCL) and through `accelerate launch` of the recipe.
#
#   bash tests/gpu/multi_gpu.sh                                   # every section (more than one 10-minute call)
#   CCE_MG_STEPS="cases vp" bash tests/gpu/multi_gpu.sh           # a subset; split the work over device calls:
#   CCE_MG_STEPS=recipes CCE_MG_MODELS=qwen2.5-0.5b-untied CCE_MG_LAYOUTS="single ddp" bash tests/gpu/multi_gpu.sh
#   then merge the calls' recipes.json locally: python tests/gpu/multi_gpu_report.py recipes A/recipes.json B/... OUT
# A CPU dry run of the plumbing (gloo, tiny shapes, ~2 min):
#   CCE_MG_DEVICE=cpu CCE_MG_STEPS="cases vp fsdp_head" CCE_VP_ARGS="--tokens 128 --hidden 32 --vocab 1001 --dtype fp32" \
#     CCE_MG_HEAD_ARCH=tiny-llama CCE_MG_HEAD_LAYERS=0 CCE_FSDP_HEAD_ARGS="--dtype fp32 --steps 1" PYTHON=.venv/bin/python \
#     TRITON_INTERPRET=1 bash tests/gpu/multi_gpu.sh
#
# Sections (CCE_MG_STEPS, default "cases vp fsdp_head recipes"), expected time on 2 H200s:
#   cases      tests/distributed_cases.py op,layouts,deepspeed on NCCL (fp32 tiny models; the CPU suite's cases,
#              compiled Triton instead of the interpreter): ~2-3 min             -> cases.json
#   vp         vocab-parallel CCE vs the single-GPU op at N=8192, D=2304, V=256000 bf16: ~1 min -> vp.json
#   fsdp_head  Qwen2.5-7B architecture (CCE_MG_HEAD_ARCH) at 4 layers under FSDP2, 8k tokens per GPU, stock vs
#              ours: peak memory per GPU and step time: ~2 min                 -> fsdp_head.json
#   recipes    the Alpaca recipe, bf16, CCE_MG_RECIPE_STEPS (100) steps, global batch 16, single GPU / DDP /
#              FSDP2 / ZeRO-3 (CCE_MG_LAYOUTS) x use_cce on/off x models (CCE_MG_MODELS): qwen2.5-0.5b-untied
#              (the Qwen2.5-0.5B architecture with its head untied, Qwen2.5 tokenizer) and llama3.2-1b (tied,
#              Llama 3.1 tokenizer); ~1-2 min a run, 16 runs: split over calls      -> recipes.json, curves.png
# Every call also rewrites tables.md (markdown for BENCHMARKS.md from whatever JSON $OUT holds) and appends to
# multi_gpu.log: at most 7 files under $OUT.
#
# Carry: .gpu_data/ (alpaca_5000.json, tokenizers/qwen2.5, tokenizers/llama3.1), .whl/ (datasets) and, for ZeRO,
# .whl-deepspeed/ (deepspeed built with DS_BUILD_OPS=0 and the dependencies the image lacks: hjson, pydantic); all
# three made by tests/gpu/fetch_wheels.sh. run_all.sh does not install .whl-deepspeed/, so the single-GPU runs keep
# the environment their tables were measured in.
# Sections needing deepspeed skip with a message when it does not import. NVLink multicast stays off (the
# device's rule): NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are exported.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/outputs/multi_gpu}
SCRATCH=${CCE_SCRATCH:-/tmp/cce_multi_gpu}
mkdir -p "$OUT" "$SCRATCH"
STEPS=${CCE_MG_STEPS:-cases vp fsdp_head recipes}
PY=${PYTHON:-python3}
NGPU=${CCE_MG_GPUS:-2}
DEV=${CCE_MG_DEVICE:-cuda}  # cpu: a dry run of the plumbing on gloo (cases, vp, fsdp_head), with small CCE_*_ARGS
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[[ $DEV == cuda ]] && unset TRITON_INTERPRET  # compiled kernels on the GPU; the CPU dry run interprets them
exec > >(tee -a "$OUT/multi_gpu.log") 2>&1

# shellcheck source=tests/gpu/lib.sh
source tests/gpu/lib.sh
declare -A RESULT

hr "environment (sections: $STEPS)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=()
for w in .whl/*.whl .whl-deepspeed/*.whl; do [[ -f $w ]] && WHEELS+=("$w"); done
install_wheels "${WHEELS[@]}"
nvidia-smi -L || echo "WARNING: nvidia-smi failed"
print_versions torch triton transformers accelerate deepspeed datasets matplotlib cce_patch
"$PY" - <<'EOF'
import torch
print("cuda devices:", torch.cuda.device_count())
EOF
HAS_DS=$("$PY" -c "import deepspeed" >/dev/null 2>&1 && echo 1 || echo 0)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU")

# --- cases: the CPU suite's workers on NCCL ---------------------------------------------------------------
if want cases; then
  SUITES=op,layouts$([[ $HAS_DS == 1 ]] && echo ,deepspeed)
  [[ $HAS_DS == 1 ]] || echo "deepspeed does not import: the ZeRO cases are skipped (carry its wheel in .whl/)"
  run_section cases "${CCE_TIMEOUT_CASES:-420}" env CCE_DIST_DEVICE="$DEV" \
    "${TORCHRUN[@]}" tests/distributed_cases.py "$SUITES" "$SCRATCH/cases" "$SCRATCH/checkpoints"
  "$PY" - "$SCRATCH/cases" "$OUT/cases.json" <<'EOF'
import json, sys
from pathlib import Path
found = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
bad = [f"{s}: {c['name']}: {c.get('error', '')[:200]}" for s, d in found.items() for c in d["cases"] if "error" in c]
print(f"cases: {sum(len(d['cases']) for d in found.values())} run, {len(bad)} raised" + "".join(f"\n  {b}" for b in bad))
EOF
fi

# --- vp: vocab-parallel CCE across the GPUs vs the single-GPU op, paper shape -----------------------------------
if want vp; then
  run_section vp "${CCE_TIMEOUT_VP:-300}" "${TORCHRUN[@]}" tests/gpu/vocab_parallel_bench.py --device "$DEV" \
    --out "$OUT/vp.json" \
    ${CCE_VP_ARGS:-}
fi

# --- fsdp_head: a 7B-class head under FSDP2, 8k tokens per GPU, stock vs ours --------------------------------------
if want fsdp_head; then
  run_section fsdp_head "${CCE_TIMEOUT_FSDP_HEAD:-400}" "${TORCHRUN[@]}" tests/gpu/fsdp_head_bench.py --device "$DEV" \
    --arch "${CCE_MG_HEAD_ARCH:-qwen2.5-7b}" --layers "${CCE_MG_HEAD_LAYERS:-4}" --tokens 8192 \
    --out "$OUT/fsdp_head.json" ${CCE_FSDP_HEAD_ARGS:-}
fi

# --- recipes: accelerate launch of the Alpaca recipe, every layout, use_cce on and off ---------------------------
if want recipes; then
  mkdir -p "$SCRATCH/recipes" "$SCRATCH/models"
  "$PY" - "$SCRATCH/models" <<'EOF'
import sys
from cce_patch.models.architectures import architecture_config
architecture_config("qwen2.5-0.5b", tie_word_embeddings=False).save_pretrained(f"{sys.argv[1]}/qwen2.5-0.5b-untied")
EOF
  for model in ${CCE_MG_MODELS:-qwen2.5-0.5b-untied llama3.2-1b}; do
    case $model in
      qwen2.5-0.5b-untied) arch=$SCRATCH/models/qwen2.5-0.5b-untied; tok=.gpu_data/tokenizers/qwen2.5 ;;
      llama3.2-1b) arch=llama3.2-1b; tok=.gpu_data/tokenizers/llama3.1 ;;
      *) arch=$model; tok=${CCE_MG_TOKENIZER:-.gpu_data/tokenizers/qwen2.5} ;;
    esac
    for layout in ${CCE_MG_LAYOUTS:-single ddp fsdp2 zero3}; do
      if [[ $layout == zero* && $HAS_DS != 1 ]]; then
        echo "SKIPPED $model $layout: deepspeed does not import"; RESULT[recipe-$model-$layout]="skipped: no deepspeed"; continue
      fi
      if [[ $layout == single ]]; then accel=(--config_file configs/accelerate/single-gpu.yaml --num_processes 1); per=16
      else accel=(--config_file "configs/accelerate/$layout.yaml" --num_processes "$NGPU"); per=$((16 / NGPU)); fi
      for cce in true false; do
        name=$model-$layout-cce_$cce
        run_section "recipe-$name" "${CCE_TIMEOUT_RECIPE:-300}" "$PY" -m accelerate.commands.launch "${accel[@]}" \
          tests/distributed_recipe.py "$SCRATCH/recipes/$name.json" --model_config "$arch" \
          --tokenizer_name_or_path "$tok" --dataset_path .gpu_data/alpaca_5000.json --bf16 true \
          --max_steps "${CCE_MG_RECIPE_STEPS:-100}" --per_device_train_batch_size "$per" --max_length 512 \
          --learning_rate 1e-4 --warmup_steps 10 --logging_steps 1 --seed 0 --save_strategy no --report_to none \
          --disable_tqdm true --sample_answers 0 --use_cce "$cce" --output_dir "$SCRATCH/out/$name" ${CCE_MG_RECIPE_ARGS:-}
      done
    done
  done
  "$PY" tests/gpu/multi_gpu_report.py recipes "$SCRATCH/recipes" "$OUT"
fi

hr tables
"$PY" tests/gpu/multi_gpu_report.py tables "$OUT" | tee "$OUT/tables.md"

hr summary
status=0
for s in "${!RESULT[@]}"; do
  echo "$s: ${RESULT[$s]}"
  [[ ${RESULT[$s]} == rc=0* || ${RESULT[$s]} == skipped* ]] || status=1
done
ls -la "$OUT"
exit $status
