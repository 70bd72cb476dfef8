"""Peak device memory of one call, above what was allocated before it (so the inputs are excluded).

What it counts: every tensor the call allocates and frees (logits, chunk buffers, workspaces) plus what it
returns (for fwd+bwd, the gradients themselves). That is the number a training step pays on top of its
inputs, and the one the peers' published figures use.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def free_cached(device: torch.device) -> None:
    """Drop garbage and the caching allocator's free blocks (after an OOM, between methods)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_mb_above_inputs(fn: Callable[[], object], device: torch.device) -> float | None:
    """MB (1e6 bytes) of ``max_memory_allocated`` during ``fn()`` minus ``memory_allocated`` before it.

    ``None`` on CPU, where PyTorch keeps no allocator statistics. The call's result is dropped before
    returning, so nothing it allocated outlives the measurement.
    """
    if device.type != "cuda":
        fn()
        return None
    free_cached(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - before) / 1e6


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: the device's (PyTorch's type, or any error whose message says so, e.g. a
    peer library's allocation inside Triton) and the host's (PyTorch's CPU allocator refusing a buffer, which
    raises a plain ``RuntimeError``: on a CPU run a method that cannot fit is an OOM cell, not a broken
    method). Triton's ``OutOfResources`` (shared memory at compile time) is a bug in the kernel
    configuration, not an OOM, and is reported as an error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text
