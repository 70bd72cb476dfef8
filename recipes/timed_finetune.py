"""The Alpaca recipe, unchanged, with every optimizer step recorded as it ends.

    accelerate launch recipes/timed_finetune.py --step_log run.jsonl configs/gemma2-2b.yaml [recipe flags ...]

``--step_log PATH`` (taken out before the recipe parses its arguments) gets one JSON line per optimizer step,
flushed at once, so a run killed mid-way still leaves its rows: the step, its wall time (from the previous step's
end, the first one from the start of training, so it includes compilation and autotuning; the device is
synchronised before each clock read), the input tokens seen so far (padding included, the Trainer's
``num_input_tokens_seen``) and the peak memory so far; the logged loss arrives in its own line (``logging_steps``
decides which steps have one; with ``filter_eps`` it also carries ``cce_filter_skipped_fraction`` and
``cce_filter_max_row_dropped_mass``). A last line ``{"done": true, ...}`` closes a run that finished. Only the main
process writes. ``family_runs.py`` runs the shipped recipe through this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_alpaca  # noqa: E402


class StepRecorder(TrainerCallback):
    """Writes the step lines (see the module doc) to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = 0.0
        self._file = None

    def _write(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @staticmethod
    def _peak_gib() -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            self._write({"start": True, "max_steps": state.max_steps, "time": time.time()})
        self._sync()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self._write({"step": state.global_step, "seconds": round(now - self._last, 4),
                     "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0), "peak_gib": self._peak_gib()})
        self._last = time.perf_counter()  # the write is not the next step's time

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            # with filter_eps, what the filter skipped since the last log (CCETrainer puts it in the same logs)
            extra = {k: float(v) for k, v in logs.items() if k.startswith("cce_filter_")}
            self._write({"step": state.global_step, "loss": float(logs["loss"]), **extra})

    def on_train_end(self, args, state, control, **kwargs):
        self._write({"done": True, "steps": state.global_step, "peak_gib": self._peak_gib()})
        if self._file is not None:
            self._file.close()
            self._file = None


def split_step_log(argv: list[str]) -> tuple[Path | None, list[str]]:
    """``--step_log PATH`` (or ``--step_log=PATH``) out of ``argv``; the rest is the recipe's."""
    rest, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--step_log" and i + 1 < len(argv):
            path, i = Path(argv[i + 1]), i + 2
            continue
        if arg.startswith("--step_log="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return path, rest


def main(argv: list[str] | None = None):
    path, rest = split_step_log(sys.argv[1:] if argv is None else argv)
    return finetune_alpaca.main(rest, callbacks=[StepRecorder(path)] if path else None)


if __name__ == "__main__":
    main()
    finetune_alpaca.close_distributed()
