"""The measurement loop: for each shape and regime, generate inputs once, compute the fp32 ground truth, then
measure every method (fwd ms, fwd MB, fwd+bwd ms, fwd+bwd MB, dE/dC relative error, loss difference).

Each phase of each method is isolated: an out-of-memory error or any exception is recorded in that record's
``status`` and the run goes on, so one broken peer never costs the numbers of the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from . import methods as M
from .accuracy import GroundTruth, fp32_ground_truth, rel_err
from .memory import free_cached, is_oom, peak_mb_above_inputs
from .regimes import make_inputs
from .timing import median_ms

log = logging.getLogger("cce_patch.bench")


@dataclass
class Record:
    """One (method, shape, regime) measurement. ``None`` = not measured (see ``status``)."""

    method: str
    n: int
    d: int
    v: int
    regime: str
    dtype: str
    description: str = ""
    head: str = ""  # the model head's name in a heads run (``--heads``), for the per-head tables
    fwd_ms: float | None = None
    fwd_mb: float | None = None
    fwdbwd_ms: float | None = None
    fwdbwd_mb: float | None = None
    de_rel_err: float | None = None
    dc_rel_err: float | None = None
    loss_abs_err: float | None = None
    grads_mb: float = 0.0
    status: dict = field(default_factory=dict)  # phase -> "ok" | "OOM" | "skipped: ..." | "error: ..."

    @property
    def ok(self) -> bool:
        return all(s == "ok" for s in self.status.values())


@dataclass
class BenchConfig:
    shapes: list[tuple[int, int, int]]
    regimes: list[str]
    methods: list[str]
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    errors: bool = True
    warmup_ms: float = 100.0
    rep_ms: float = 500.0
    cpu_repeats: int = 3
    #: ``(D, V) -> name`` of the model heads in a heads run: the records carry the name (the per-head tables)
    heads: dict[tuple[int, int], str] = field(default_factory=dict)
    #: Time the forward alone too. Off in a heads run, whose table is fwd+bwd only: that saves a torch.compile
    #: graph and a timing loop per shape. Forward-only methods (the GEMM floor) are timed either way.
    fwd: bool = True


def _run_phase(rec: Record, phase: str, device: torch.device, fn: Callable[[], None]) -> None:
    try:
        fn()
        rec.status[phase] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, never fatal
        if is_oom(exc):
            rec.status[phase] = "OOM"
        else:
            rec.status[phase] = (
                f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
            log.debug("phase %s of %s failed", phase, rec.method, exc_info=True)
    finally:
        free_cached(device)


def measure(method: M.Method, e, c, t, ref: GroundTruth | None, rec: Record, cfg: BenchConfig) -> Record:
    dev = cfg.device
    timing = dict(warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, cpu_repeats=cfg.cpu_repeats)

    def fwd():
        with torch.no_grad():
            return method.loss(e, c, t)

    def time_fwd():
        rec.fwd_ms = median_ms(fwd, dev, **timing)

    def mem_fwd():
        rec.fwd_mb = peak_mb_above_inputs(fwd, dev)

    if cfg.fwd or method.fwd_only:
        _run_phase(rec, "fwd", dev, time_fwd)
        if rec.status["fwd"] == "ok":
            _run_phase(rec, "fwd_mem", dev, mem_fwd)
    else:
        rec.status["fwd"] = "skipped: fwd+bwd only"
    if method.fwd_only:
        rec.status["fwdbwd"] = "skipped: forward only"
        return rec

    e_ = e.detach().requires_grad_(True)
    c_ = c.detach().requires_grad_(True)

    def fwdbwd():
        loss = method.loss(e_, c_, t)
        return torch.autograd.grad(loss, (e_, c_))

    def time_fwdbwd():
        rec.fwdbwd_ms = median_ms(fwdbwd, dev, **timing)

    def mem_fwdbwd():
        rec.fwdbwd_mb = peak_mb_above_inputs(fwdbwd, dev)

    def errors():
        loss = method.loss(e_, c_, t)
        de, dc = torch.autograd.grad(loss, (e_, c_))
        rec.loss_abs_err = abs(float(loss.detach()) - ref.loss)
        rec.de_rel_err = rel_err(de, ref.de)
        rec.dc_rel_err = rel_err(dc, ref.dc)

    _run_phase(rec, "fwdbwd", dev, time_fwdbwd)
    if rec.status["fwdbwd"] == "ok":
        _run_phase(rec, "fwdbwd_mem", dev, mem_fwdbwd)
        if ref is not None:
            _run_phase(rec, "errors", dev, errors)
    return rec


def run(cfg: BenchConfig, on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Measure every (shape, regime, method); ``on_record`` is called as each record completes (progress)."""
    records: list[Record] = []
    dtype_name = str(cfg.dtype).removeprefix("torch.")
    elem = torch.finfo(cfg.dtype).bits // 8
    for n, d, v in cfg.shapes:
        built: list[M.Method | str] = []
        for spec in cfg.methods:
            try:
                built.append(M.build(spec, cfg.device))
            except M.MethodUnavailable as exc:
                built.append(f"{spec}\0{exc}")
        for regime in cfg.regimes:
            t0 = time.perf_counter()
            e, c, t = make_inputs(regime, n, d, v, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
            ref = None
            ref_status = ""
            if cfg.errors:
                try:
                    ref = fp32_ground_truth(e, c, t)
                except Exception as exc:  # noqa: BLE001
                    ref_status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"
                    free_cached(cfg.device)
            log.info(
                "inputs %s N=%d D=%d V=%d ready in %.1fs%s",
                regime,
                n,
                d,
                v,
                time.perf_counter() - t0,
                f" (fp32 ground truth: {ref_status})" if ref_status else "",
            )
            for m in built:
                if isinstance(m, str):
                    spec, reason = m.split("\0")
                    rec = Record(spec, n, d, v, regime, dtype_name, head=cfg.heads.get((d, v), ""),
                                 status={"all": f"skipped: {reason}"})
                else:
                    rec = Record(
                        m.name,
                        n,
                        d,
                        v,
                        regime,
                        dtype_name,
                        description=m.description,
                        head=cfg.heads.get((d, v), ""),
                        grads_mb=(n * d + v * d) * elem / 1e6,
                    )
                    t1 = time.perf_counter()
                    measure(m, e, c, t, ref, rec, cfg)
                    if ref is None and cfg.errors and not m.fwd_only:
                        rec.status["errors"] = f"skipped: fp32 ground truth {ref_status}"
                    log.info("  %-16s %s in %.1fs", rec.method, _brief(rec), time.perf_counter() - t1)
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
            del e, c, t, ref
            free_cached(cfg.device)
    return records


def _brief(rec: Record) -> str:
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    g = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
    bad = {k: s for k, s in rec.status.items() if s != "ok"}
    return (
        f"fwd {f(rec.fwd_ms, 2)} ms / {f(rec.fwd_mb, 1)} MB, fwd+bwd {f(rec.fwdbwd_ms, 2)} ms / "
        f"{f(rec.fwdbwd_mb, 1)} MB, dE {g(rec.de_rel_err)} dC {g(rec.dc_rel_err)}"
        + (f" {bad}" if bad else "")
    )


def records_to_dicts(records: Iterable[Record]) -> list[dict]:
    return [asdict(r) for r in records]
