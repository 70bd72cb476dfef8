"""Wall-time of a callable: CUDA events through ``triton.testing.do_bench`` on GPU, ``perf_counter`` on CPU.

Why adaptive repetitions: ``do_bench`` sizes its loop from a ``rep`` budget in milliseconds, so a 225 ms
method under a 100 ms budget would be timed once. We first time one call, then give ``do_bench`` a budget
of at least ``min_runs`` calls, so every method's median is over several samples whatever its speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 100.0,
    rep_ms: float = 500.0,
    min_runs: int = 7,
    cpu_repeats: int = 3,
) -> float:
    """Median milliseconds of ``fn()`` after warm-up (the first call also triggers compilation / autotuning).

    On CUDA: ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events, L2 flushed between calls),
    falling back to a CUDA-event loop if Triton is absent. On CPU: the median of ``cpu_repeats`` timed calls.
    """
    fn()  # compile / autotune / allocator warm-up, outside every measurement
    estimate = _once_ms(fn, device)
    if device.type != "cuda":
        return statistics.median([estimate] + [_once_ms(fn, device) for _ in range(max(0, cpu_repeats - 1))])
    warmup = max(warmup_ms, 2 * estimate)
    rep = max(rep_ms, min_runs * estimate)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=int(warmup), rep=int(rep), return_mode="median"))
    return _event_loop_ms(fn, warmup, rep, estimate)


def _event_loop_ms(fn: Callable[[], object], warmup: float, rep: float, estimate: float) -> float:
    n_warm = max(1, int(warmup / max(estimate, 1e-3)))
    n_rep = max(1, int(rep / max(estimate, 1e-3)))
    return event_median_ms(fn, n_warm, n_rep)


def event_median_ms(fn: Callable[[], object], n_warm: int, n_rep: int) -> float:
    """Median of ``n_rep`` CUDA-event-timed calls after ``n_warm`` untimed ones. Also for ops of a second or
    more, where ``do_bench``'s own warm-up and estimate would take many calls."""
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
