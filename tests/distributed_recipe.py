"""Runs recipes/finetune_alpaca.py as a user would, and records what it really ran under.

    torchrun --standalone --nproc_per_node 2 tests/distributed_recipe.py OUT.json [recipe arguments...]

The recipe runs as ``__main__`` (``runpy``) with its own command line. ``Trainer.train`` is wrapped in this
process only, to record the world size, accelerate's distributed type, the type of the model the Trainer
trained (``model_wrapped``: DDP, an FSDP2 module, a DeepSpeed engine) and whether it was patched, so the test
can assert the layout it believes it tests: accelerate on CPU quietly falls back to one process or to plain DDP.
Rank 0 writes OUT.json with those facts, the logged losses, the training time, every step's wall time and every
rank's peak CUDA memory.
``accelerate launch [--config_file ...] tests/distributed_recipe.py OUT.json ...`` works the same way (the GPU run,
tests/gpu/multi_gpu.sh).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch.distributed as dist
import transformers

ROOT = Path(__file__).resolve().parents[1]
FACTS: dict = {}


def _peak_memory_gib() -> list[float | None]:
    """Every rank's peak CUDA memory (GiB) since start, or None per rank on CPU."""
    import torch

    mine = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if not dist.is_initialized():
        return [mine]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


class _StepTimer(transformers.TrainerCallback):
    """Wall seconds of every optimizer step, so a table can tell the first step (which compiles kernels: Triton's
    on a fresh machine, torch.compile's) from the steady state that the run's total time mixes in."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._t0)


def _record(train):
    def wrapped(self, *args, **kwargs):
        timer = _StepTimer()
        self.add_callback(timer)
        result = train(self, *args, **kwargs)
        from cce_patch import is_patched

        FACTS.update(
            peak_memory_gib_per_rank=_peak_memory_gib(),
            train_runtime_s=result.metrics.get("train_runtime"),
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            trainer_world_size=self.args.world_size,
            distributed_type=str(self.accelerator.distributed_type),
            model_wrapped=type(self.model_wrapped).__name__,
            wrapper_module=type(self.model_wrapped).__module__,
            patched=is_patched(self.model),
            use_cce=bool(getattr(self.args, "use_cce", False)),
            losses=[h["loss"] for h in self.state.log_history if "loss" in h],
            step_seconds=[round(t, 5) for t in timer.seconds],
            global_step=self.state.global_step,
        )
        return result

    return wrapped


def main() -> None:
    out, recipe_args = Path(sys.argv[1]), sys.argv[2:]
    transformers.Trainer.train = _record(transformers.Trainer.train)
    sys.argv = [str(ROOT / "recipes" / "finetune_alpaca.py"), *recipe_args]
    runpy.run_path(sys.argv[0], run_name="__main__")  # the recipe destroys its process group when it is done
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    if rank == 0:
        out.write_text(json.dumps(FACTS, indent=1))


if __name__ == "__main__":
    main()
