"""The largest tokens per training step that fit in memory: a search over the batch at a fixed sequence length.

Each probe is one real training step (forward + backward, gradient checkpointing, no optimizer) at batch b:
it fits, or it runs out of memory. Steps near the limit are the expensive ones (a 128k-token step of
Gemma-2-2B is ~16 times the 8k-token step), so the search spends few of them: after batch 1 and 2 the peak
memory per sequence is known (it is linear in the batch at a fixed length), the predicted limit is probed,
and bisection closes the bracket to within ``rel_tol``. ``cap_tokens`` and ``budget_s`` bound it; the answer
says which bound ended it: ``exact`` (fits at ``tokens``, not at ``fails_at_tokens``, within ``rel_tol``),
``cap`` (fits at the cap), ``time`` (the next probe would overrun the budget) or ``none`` (batch 1 does not
fit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..memory import free_cached, is_oom
from .step import random_batch, sync, training_step

log = logging.getLogger("cce_patch.bench")


@dataclass(frozen=True)
class SearchConfig:
    cap_tokens: int = 131072
    budget_s: float = 60.0
    rel_tol: float = 1 / 32
    seq: int | None = None  # None: the sequence length of the timed step
    memory_limit_bytes: int | None = None  # for the prediction; None: what the device has free at the start


@dataclass(frozen=True)
class Probe:
    batch: int
    fits: bool
    peak_bytes: int | None
    seconds: float


def largest_fitting(
    probe: Callable[[int], Probe],
    cap: int,
    budget_s: float,
    rel_tol: float = 1 / 32,
    limit_bytes: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, int, str, list[Probe]]:
    """(largest batch that fit, smallest that did not (``cap + 1`` if none failed), bound, probes) for batches
    in ``[1, cap]``, assuming that a batch fits whenever a larger one does."""
    lo, hi, probes = 0, cap + 1, []
    start = clock()
    creep = 0  # consecutive fits above a prediction that was too low: the step doubles each time
    last_was_jump = False  # the last probe was the predicted limit
    while True:
        if lo >= cap:
            return lo, hi, "cap", probes
        tol = max(1, int(lo * rel_tol))
        if hi - lo <= tol:
            return lo, hi, "exact" if lo else "none", probes
        predicted = _predict(probes, limit_bytes)
        creeping, jumped = False, False
        if lo == 0:
            b = 1
        elif hi > cap:  # no failure yet: jump to the predicted limit; without a prediction, double
            if predicted is not None and predicted > lo:
                b, jumped = predicted, True
            elif predicted is not None:
                b, creeping = lo + tol * 2**creep, True
            else:
                b = 2 * lo
            b = min(cap, b)
        elif last_was_jump and not probes[-1].fits and lo < int(hi * (1 - 2 * rel_tol)) < hi:
            # A predicted limit that overshot is usually close: once, just below it. Not again: where the peak is
            # not linear in the batch (stock Llama-3.1-8B: the gradients set the peak at small batches, the
            # logits at large ones) the prediction is far off, and creeping down from it costs a probe per step.
            b = int(hi * (1 - 2 * rel_tol))
        else:
            b = (lo + hi) // 2
        fitting = [p for p in probes if p.fits]
        if len(fitting) >= 2:  # a step's time is about linear in the batch: skip a probe that would overrun the
            # budget. Batches 1 and 2 always run (the smallest steps); then the cheapest seconds per sequence seen
            # is extrapolated: small probes carry one-time costs (the first call at a new shape compiles kernels,
            # the allocator grows) that would otherwise be charged to the large ones.
            per_seq = min(p.seconds / p.batch for p in fitting)
            if per_seq * b > budget_s - (clock() - start):
                return lo, hi, "time", probes
        p = probe(b)
        probes.append(p)
        log.debug("probe batch %d: %s in %.1fs", b, "fits" if p.fits else "out of memory", p.seconds)
        if p.fits:
            lo = max(lo, b)
        else:
            hi = min(hi, b)
        creep = creep + 1 if creeping and p.fits else 0
        last_was_jump = jumped


def _predict(probes: list[Probe], limit: int | None) -> int | None:
    """The batch at which the peak reaches ``limit``, from a line through the fitting probes' peaks."""
    points = sorted({p.batch: p.peak_bytes for p in probes if p.fits and p.peak_bytes is not None}.items())
    if limit is None or len(points) < 2:
        return None
    (b0, m0), (b1, m1) = points[0], points[-1]
    slope = (m1 - m0) / (b1 - b0)
    if slope <= 0:
        return None
    return int(b0 + (limit - m0) / slope)


def search_max_tokens(model: torch.nn.Module, seq: int, device: torch.device, cfg: SearchConfig,
                      seed: int = 0) -> dict:
    """Run the search on ``model`` as it is now (a variant applied), at ``cfg.seq`` (or ``seq``) tokens per
    sequence. Returns the JSON-ready answer (see the module doc)."""
    seq = cfg.seq or seq
    cap = max(1, cfg.cap_tokens // seq)
    free_cached(device)
    limit = cfg.memory_limit_bytes
    if limit is None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit = free + torch.cuda.memory_reserved(device)

    def probe(batch: int) -> Probe:
        ids, labels = random_batch(model.config.vocab_size, batch, seq, device, seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fits = True
        try:
            training_step(model, ids, labels)
            sync(device)
        except Exception as exc:  # noqa: BLE001 - only running out of memory is an answer
            if not is_oom(exc):
                raise
            fits = False
        seconds = time.perf_counter() - t0  # the step alone: freeing the cache below is not the step's cost
        peak = torch.cuda.max_memory_allocated(device) if fits and device.type == "cuda" else None
        del ids, labels
        model.zero_grad(set_to_none=True)
        free_cached(device)
        return Probe(batch, fits, peak, seconds)

    t0 = time.perf_counter()
    lo, hi, bound, probes = largest_fitting(probe, cap, cfg.budget_s, cfg.rel_tol, limit)
    return {
        "seq": seq,
        "batch": lo,
        "tokens": lo * seq,
        "bound": bound,
        "fails_at_tokens": hi * seq if hi <= cap else None,
        "cap_tokens": cap * seq,
        "seconds": round(time.perf_counter() - t0, 2),
        "probes": [
            {**asdict(p), "tokens": p.batch * seq,
             "peak_gib": None if p.peak_bytes is None else round(p.peak_bytes / 2**30, 3)}
            for p in probes
        ],
    }
