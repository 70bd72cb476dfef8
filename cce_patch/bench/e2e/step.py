"""One training step of the benchmark and its inputs: what ``measure.py`` (the timed steps) and
``max_tokens.py`` (the probes of the search) both run, kept here so neither imports the other."""

from __future__ import annotations

import torch


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    """Random tokens, and labels with a masked prompt (the first 1/16 of each sequence), as instruction tuning
    has."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : max(1, seq // 16)] = -100
    return ids, labels


def training_step(model, ids, labels, keep_grads: bool = False) -> torch.Tensor:
    """Forward + backward; the loss (detached). Gradients are dropped unless ``keep_grads``."""
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    loss = out.loss.detach()
    del out
    if not keep_grads:
        model.zero_grad(set_to_none=True)
    return loss


def sync(device: torch.device) -> None:
    """Wait for the device, so a host clock or a peak-memory read covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
