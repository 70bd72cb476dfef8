"""The Trainer-loop mode of the e2e benchmark: what a user's fine-tuning step costs, not one fwd+bwd of a fixed
batch. N optimizer steps (AdamW, as the Trainer's default) over variable-length batches padded to the longest
(prompts masked, padding masked), as ``DataCollatorForSeq2Seq`` gives them; per variant the loss of every step,
the first step's time (compilation and autotuning included), the median step time after the warm-up steps,
tokens per second (label-bearing and prompt tokens, padding excluded) over those steps and the peak memory,
optimizer states included. Every variant starts from the same weights (restored after each)."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from .step import sync


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 60
    warmup: int = 10  # steps left out of the median and tokens/s (the first one is reported on its own)
    batch: int = 16
    min_len: int = 32
    max_len: int = 512
    lr: float = 1e-5
    seed: int = 0


def variable_batches(vocab: int, cfg: LoopConfig, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``cfg.steps`` batches of ``cfg.batch`` random sequences of ``min_len``..``max_len`` tokens, right-padded to
    the batch's longest; the first 10-50% of each sequence is its prompt (label -100), padding is -100 too."""
    rng = random.Random(cfg.seed)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    batches = []
    for _ in range(cfg.steps):
        lengths = [rng.randint(cfg.min_len, cfg.max_len) for _ in range(cfg.batch)]
        width = max(lengths)
        ids = torch.zeros(cfg.batch, width, dtype=torch.long)
        mask = torch.zeros(cfg.batch, width, dtype=torch.long)
        labels = torch.full((cfg.batch, width), -100, dtype=torch.long)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.randint(0, vocab, (n,), generator=g)
            mask[row, :n] = 1
            prompt = max(1, int(n * rng.uniform(0.1, 0.5)))
            labels[row, prompt:n] = ids[row, prompt:n]
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return batches


def run_loop(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             cfg: LoopConfig) -> dict:
    """Train ``model`` (compiled or not, a variant applied) on ``batches``; the JSON-ready answer. The weights
    change: the caller restores them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach()
        del out
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    timed = times[cfg.warmup:] if len(times) > cfg.warmup else times[1:]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[len(times) - len(timed):])
    return {
        "steps": len(times), "batch": cfg.batch, "min_len": cfg.min_len, "max_len": cfg.max_len,
        "first_step_ms": round(times[0] * 1e3, 1) if times else None,
        "median_step_ms": round(statistics.median(timed) * 1e3, 2) if timed else None,
        "tokens_per_s": round(tokens / sum(timed), 1) if timed else None,
        "peak_gib": None if peak is None else round(peak, 3),
        "losses": [round(x, 5) for x in losses],
    }


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers, copied to the CPU (the loop's variants each start from them)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
