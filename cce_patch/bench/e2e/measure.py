"""One training step of each variant on the same model: loss, gradient norm, peak memory, step time; and,
when asked, the largest tokens per step that fit (``max_tokens.py``).

A step is forward + backward with gradient checkpointing (no optimizer: its states cost the same for every
variant). The first step gives the loss, the gradient norm and the peak memory (absolute, and above the weights
and inputs); then ``warmup`` + ``steps`` timed steps, median reported. Each variant's failure (out of memory,
an error, a peer not installed) is recorded in its row and the others still run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..memory import free_cached, is_oom
from .build import Variant, applied, build_model, unavailable_reason
from .compile import compile_model, graph_breaks
from .loop import LoopConfig, restore, run_loop, snapshot, variable_batches
from .max_tokens import SearchConfig, search_max_tokens
from .step import random_batch, sync, training_step

log = logging.getLogger("cce_patch.bench")


@dataclass
class E2ERecord:
    model: str
    variant: str
    batch: int
    seq: int
    dtype: str
    attn: str = ""
    loss: float | None = None
    loss_rel_diff: float | None = None  # vs stock
    grad_norm: float | None = None
    grad_norm_rel_diff: float | None = None  # vs stock
    weights_gib: float | None = None
    peak_gib: float | None = None
    above_weights_gib: float | None = None
    step_ms: float | None = None
    status: str = "ok"
    options: dict = field(default_factory=dict)
    max_tokens: dict | None = None  # max_tokens.search_max_tokens's answer, when the search ran
    compiled: bool = False  # the model ran under torch.compile
    graph_breaks: dict | None = None  # compile.graph_breaks's answer, for a compiled variant
    loop: dict | None = None  # loop.run_loop's answer, in the Trainer-loop mode

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def measure_variant(model, ids, labels, rec: E2ERecord, device: torch.device, steps: int, warmup: int) -> None:
    """First step: loss + gradient norm (+ peak memory on CUDA). Then ``warmup`` + ``steps`` timed steps."""
    model.zero_grad(set_to_none=True)
    free_cached(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss = training_step(model, ids, labels, keep_grads=True)
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        rec.peak_gib = peak / 2**30
        rec.above_weights_gib = (peak - before) / 2**30
    rec.loss = float(loss)
    sq = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    rec.grad_norm = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
    model.zero_grad(set_to_none=True)
    for _ in range(warmup):
        training_step(model, ids, labels)
    times = []
    for _ in range(steps):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            training_step(model, ids, labels)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            training_step(model, ids, labels)
            times.append((time.perf_counter() - t0) * 1e3)
    rec.step_ms = statistics.median(times) if times else None


def run_model(
    name: str,
    variants: list[Variant],
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    seed: int,
    attn: str = "sdpa",
    search: SearchConfig | None = None,
    loop: LoopConfig | None = None,
    compile_mode: str = "off",
    compile_backend: str = "inductor",
) -> list[E2ERecord]:
    """Every variant on one instance of architecture ``name``: the step measurement, then (with ``search``)
    the max-tokens search, then (with ``loop``) the Trainer-loop steps, from the same weights for each variant.
    ``compile_mode``: "off", "on" (every variant under torch.compile) or "both" (each variant eager, then
    compiled, labelled ``<variant>+compile``). Losses and gradient norms are compared with the stock variant's
    (eager stock, when it ran)."""
    dtype_name = str(dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    model = build_model(name, device, dtype, seed, attn)
    attn_used = getattr(model.config, "_attn_implementation", attn)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    ids, labels = random_batch(model.config.vocab_size, batch, seq, device, seed)
    log.info("%s: %.2f GiB of weights built in %.1fs", name, weights, time.perf_counter() - t0)
    records: list[E2ERecord] = []
    stock: E2ERecord | None = None
    batches = variable_batches(model.config.vocab_size, loop, device) if loop is not None else None
    weights_before = snapshot(model) if loop is not None else None
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[compile_mode]
    for variant, compiled in [(v, c) for v in variants for c in modes]:
        label = f"{variant.label}+compile" if compiled and compile_mode == "both" else variant.label
        rec = E2ERecord(name, label, batch, seq, dtype_name, attn=attn_used, weights_gib=weights,
                        options=dict(variant.options), compiled=compiled)
        t1 = time.perf_counter()
        reason = unavailable_reason(variant, device)
        if reason is not None:
            rec.status = f"skipped: {reason}"
        else:
            try:
                with applied(model, variant):
                    target = model
                    if compiled:
                        rec.graph_breaks = graph_breaks(model, {"input_ids": ids, "labels": labels})
                        target = compile_model(model, compile_backend)
                    _measure_guarded(target, ids, labels, rec, device, steps, warmup)
                    if search is not None:  # also after an OOM at the timed size: the search goes smaller
                        rec.max_tokens = search_max_tokens(target, seq, device, search, seed)
                    if loop is not None:
                        try:
                            rec.loop = run_loop(target, batches, device, loop)
                        finally:
                            model.zero_grad(set_to_none=True)
                            restore(model, weights_before)
            except Exception as exc:  # noqa: BLE001 - e.g. applying a peer failed; recorded, the rest runs
                rec.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
                log.debug("variant %s failed", label, exc_info=True)
            finally:
                model.zero_grad(set_to_none=True)
                if compiled:
                    torch._dynamo.reset()
                free_cached(device)
        if variant.name == "stock" and not compiled and rec.status == "ok":
            stock = rec
        elif stock is not None and rec.loss is not None:
            rec.loss_rel_diff = abs(rec.loss - stock.loss) / max(abs(stock.loss), 1e-12)
            rec.grad_norm_rel_diff = abs(rec.grad_norm - stock.grad_norm) / max(stock.grad_norm, 1e-12)
        log.info("  %-12s %s in %.1fs", label, brief(rec), time.perf_counter() - t1)
        records.append(rec)
    del model
    free_cached(device)
    return records


def _measure_guarded(model, ids, labels, rec: E2ERecord, device, steps: int, warmup: int) -> None:
    try:
        measure_variant(model, ids, labels, rec, device, steps, warmup)
    except Exception as exc:  # noqa: BLE001 - an OOM at the timed size still lets the search run smaller
        if not is_oom(exc):
            raise
        rec.status = "OOM"
        model.zero_grad(set_to_none=True)
        free_cached(device)


def brief(r: E2ERecord) -> str:
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    found = ""
    if r.max_tokens:
        found = f", max tokens/step {r.max_tokens['tokens']} ({r.max_tokens['bound']})"
    if r.graph_breaks:
        found += f", graph breaks {r.graph_breaks.get('graph_breaks', r.graph_breaks.get('error'))}"
    if r.loop:
        found += (f", loop: first {f(r.loop['first_step_ms'], 0)} ms, median {f(r.loop['median_step_ms'], 1)} ms, "
                  f"{f(r.loop['tokens_per_s'], 0)} tok/s, peak {f(r.loop['peak_gib'], 2)} GiB")
    return (
        f"loss {f(r.loss, 4)} (rel.diff {f(r.loss_rel_diff, 5)}), peak {f(r.peak_gib, 2)} GiB "
        f"({f(r.above_weights_gib, 2)} above weights+inputs), step {f(r.step_ms, 1)} ms{found}, {r.status}"
    )
