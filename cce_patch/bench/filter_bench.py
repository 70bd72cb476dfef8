"""Gradient filtering (``filter_eps``) against the exact op: time, memory, gradient error, tiles skipped (issue 23).

``python -m cce_patch.bench.filter_bench [--n 8192 --d 2304 --v 256000 --device cuda --out DIR]``

Per regime (``regimes.py``: flat, peaked, lm) at one shape, bf16, it measures the exact op (``ours``: mode auto;
``ours[mode=speed]``; ``ours[mode=memory]``), the compiled plain loss (``torch.compile``; plain ``torch`` on CPU,
where compiling needs a C++ toolchain and minutes), apple's ``cce`` when its package imports (its default gradient
filtering: the comparison issue 23 quotes), and ours with ``filter_eps`` in ``--eps`` (default 2^-12, 2^-10) in
mode auto, speed and memory. The exact and peer methods are the kernel benchmark's own (``methods.build``) and every cell
is measured by its loop (``runner.measure``: median fwd+bwd ms with warm-up, peak MB above the inputs, dE and dC
relative Frobenius error against the chunked fp32 ground truth), so the numbers compare with ``cce-patch bench``.
Each row also carries ``logit_stats`` (``regimes.describe`` on the first 256 rows: mean target probability, share
of softmax entries above 2^-12, entropy), so trained and synthetic logits can be compared by what the filter sees.

Filtered cells also record, from one more fwd+bwd with a fresh ``FilterCounter``, the fraction of (row block,
vocabulary tile) pairs skipped and the largest dropped softmax mass of a row, and every cell records the backend
that ran (``backend``: what ``resolve_impl`` picks for the call, with the warnings the call raised), because
today a filtered ``impl="auto"`` call on CUDA leaves the Triton kernels for the torch path (with a warning), and
that will change without this file changing. ``filter_vocab_order`` is passed (``--vocab-order``) only where the
op's signature has it; the row records the order asked for, or the op's default.

Output: a markdown table (ratios to exact speed mode and to the compiled loss), ``NAME.json`` rewritten after
every cell (a killed run keeps its rows) and ``NAME.png`` when matplotlib imports. ``filter_trained.py`` writes
rows of the same format for a trained model's own hidden states and head.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..ops.api import linear_cross_entropy
from ..ops.filtering import FilterCounter
from . import methods as M
from .accuracy import GroundTruth, fp32_ground_truth
from .memory import free_cached, is_oom
from .regimes import REGIMES, describe, make_inputs
from .report import environment
from .runner import BenchConfig, Record, measure

log = logging.getLogger("cce_patch.bench")

PAPER_SHAPE = (8192, 2304, 256000)
TINY_SHAPE = (256, 64, 2048)
DEFAULT_EPS = (2.0**-12, 2.0**-10)
#: The exact methods, in table order (specs of ``methods.build``). The baseline of the second ratio column is the
#: compiled loss where it ran, else plain torch (CPU).
EXACT_CUDA = ("ours", "ours[mode=speed]", "ours[mode=memory]", "torch.compile", "cce")
EXACT_CPU = ("ours", "ours[mode=speed]", "ours[mode=memory]", "torch")
FILTER_MODES = ("auto", "speed", "memory")
SPEED_BASELINE = "ours[mode=speed]"
COMPILE_BASELINES = ("torch.compile", "torch")


def op_has(name: str) -> bool:
    """Whether ``linear_cross_entropy`` takes keyword ``name`` (``filter_vocab_order`` arrives in parallel work)."""
    return name in inspect.signature(linear_cross_entropy).parameters


def vocab_order_label(asked: str | None) -> str:
    """What vocabulary order a filtered call used: the one asked for, else the op's default, else "natural" (an op
    without the option never reorders)."""
    if asked is not None:
        return asked
    param = inspect.signature(linear_cross_entropy).parameters.get("filter_vocab_order")
    if param is None:
        return "natural (op has no filter_vocab_order)"
    return f"default ({param.default!r})"


def eps_label(eps: float) -> str:
    """2^-12 for powers of two, else the number."""
    k = math.log2(eps)
    return f"2^{round(k)}" if abs(k - round(k)) < 1e-9 else f"{eps:g}"


def cell_name(eps: float, mode: str, vocab_order: str | None) -> str:
    """``ours[filter_eps=2^-12,mode=speed]`` (``,order=natural`` when an order was asked for)."""
    return f"ours[filter_eps={eps_label(eps)},mode={mode}" + (f",order={vocab_order}]" if vocab_order else "]")


def filter_method(eps: float, mode: str, vocab_order: str | None) -> tuple[M.Method, Callable[[], FilterCounter]]:
    """Ours with ``filter_eps=eps`` (``impl="auto"``, as users call it), and a function that swaps in a fresh
    counter and returns it (the next calls fill it)."""
    options: dict = {"impl": "auto", "mode": mode, "filter_eps": eps}
    if vocab_order is not None:
        if not op_has("filter_vocab_order"):
            raise M.MethodUnavailable("this linear_cross_entropy has no filter_vocab_order option")
        options["filter_vocab_order"] = vocab_order
    holder = {"counter": FilterCounter()}

    def ours_filtered(e, c, t):
        return linear_cross_entropy(e, c, t, filter_counter=holder["counter"], **options)

    def fresh() -> FilterCounter:
        holder["counter"] = FilterCounter()
        return holder["counter"]

    name = cell_name(eps, mode, vocab_order)
    return M.Method(name, ours_filtered, f"cce_patch.linear_cross_entropy({M._fmt(options)})", options=options), fresh


def backend_that_runs(options: dict, e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> dict:
    """The backend (and the mode) a call with ``options`` takes on these inputs, and the warnings it raises: read
    from the op's own dispatch (``backends.resolve_impl``, given whichever of ``filtered``/``mode``/``reduction``/
    ``return_lse`` its signature takes; ``backends.filtered_mode`` where it exists; ``choose_mode`` for auto) and
    from one real fwd+bwd, so a backend that learns to filter shows up here without a change to this file."""
    from ..ops import backends

    out: dict = {"backend": None, "mode_ran": None, "warnings": []}
    filtered = options.get("filter_eps") is not None
    mode = options.get("mode", "auto")
    e_, c_ = e.detach().requires_grad_(True), c.detach().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = {k: v for k, v in options.items() if k != "filter_counter"}
        if filtered:
            kwargs["filter_counter"] = FilterCounter()
        loss = linear_cross_entropy(e_, c_, t, **kwargs)
        torch.autograd.grad(loss, (e_, c_))
        try:
            accepted = inspect.signature(backends.resolve_impl).parameters
            call = {"filtered": filtered, "mode": mode, "reduction": "mean", "return_lse": False}
            out["backend"] = backends.resolve_impl(options.get("impl", "auto"), e.device, e.dtype,
                                                   **{k: v for k, v in call.items() if k in accepted})
        except Exception as exc:  # noqa: BLE001 - the dispatch API may change; the warnings still tell
            out["backend"] = f"unknown ({type(exc).__name__}: {exc})"
    out["warnings"] = sorted({str(w.message)[:300] for w in caught})
    if out["backend"] not in ("torch", "triton"):
        return out
    if hasattr(backends, "filtered_mode"):  # auto with a filter on Triton: speed mode where it can run the call
        mode = backends.filtered_mode(mode, out["backend"], filtered)
    if mode == "auto":
        try:
            from ..ops.mode_choice import choose_mode

            mode = choose_mode(e.reshape(-1, e.shape[-1]), c, out["backend"], wants_grad=True, reduction="mean",
                               return_lse=False, softcap=None, label_smoothing=0.0,
                               speed_chunk_bytes=options.get("speed_chunk_bytes"))
        except Exception as exc:  # noqa: BLE001
            mode = f"unknown ({type(exc).__name__})"
    out["mode_ran"] = mode
    return out


def _row(rec: Record, **extra: object) -> dict:
    return {**asdict(rec), **extra}


def measure_problem(
    e: torch.Tensor,
    c: torch.Tensor,
    t: torch.Tensor,
    regime: str,
    *,
    exact: Sequence[str],
    eps_values: Sequence[float],
    filter_modes: Sequence[str] = FILTER_MODES,
    vocab_orders: Sequence[str | None] = (None,),
    warmup_ms: float = 25.0,
    rep_ms: float = 50.0,
    cpu_repeats: int = 1,
    on_row: Callable[[dict], None] | None = None,
    built: dict[str, M.Method | str] | None = None,
) -> list[dict]:
    """Every cell (exact methods, then each eps x filter mode) on one problem ``(e, c, t)``: rows of the JSON.

    ``built`` caches the exact methods across problems of one run (torch.compile compiles once per shape).
    Non-finite inputs are refused: every method would report NaN errors, which read as "ok" in a table."""
    if not (torch.isfinite(e).all() and torch.isfinite(c).all()):
        raise ValueError(f"{regime}: the hidden states or the head's weight are not finite; nothing to measure")
    device = e.device
    n, d = e.shape
    v = c.shape[0]
    dtype = str(e.dtype).removeprefix("torch.")
    cfg = BenchConfig(shapes=[], regimes=[], methods=[], device=device, dtype=e.dtype, warmup_ms=warmup_ms,
                      rep_ms=rep_ms, cpu_repeats=cpu_repeats, fwd=False)
    t0 = time.perf_counter()
    ref: GroundTruth | None = None
    ref_status = ""
    try:
        ref = fp32_ground_truth(e, c, t)
    except Exception as exc:  # noqa: BLE001 - recorded; timings still come
        ref_status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"
        free_cached(device)
    log.info("%s N=%d D=%d V=%d: fp32 reference in %.1fs%s", regime, n, d, v, time.perf_counter() - t0,
             f" ({ref_status})" if ref_status else "")
    try:  # what the logits look like (mean target probability, share above 2^-12, entropy): trained vs synthetic
        logit_stats = describe(e, c, t)
    except Exception as exc:  # noqa: BLE001
        logit_stats = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    built = {} if built is None else built
    cells: list[tuple[str, M.Method | str, Callable[[], FilterCounter] | None, dict]] = []
    for spec in exact:
        if spec not in built:
            try:
                built[spec] = M.build(spec, device)
            except M.MethodUnavailable as exc:
                built[spec] = f"skipped: {exc}"
        cells.append((spec, built[spec], None, {"filter_eps": None, "filter_vocab_order": None}))
    for vocab_order in vocab_orders:
        for eps in eps_values:
            for mode in filter_modes:
                extra = {"filter_eps": eps, "filter_vocab_order": vocab_order_label(vocab_order)}
                try:
                    method, fresh = filter_method(eps, mode, vocab_order)
                    cells.append((method.name, method, fresh, extra))
                except M.MethodUnavailable as exc:
                    cells.append((cell_name(eps, mode, vocab_order), f"skipped: {exc}", None, extra))
    rows = []
    for name, method, fresh, extra in cells:
        extra = {**extra, "logit_stats": logit_stats, "skipped_fraction": None, "max_row_dropped_mass": None, "tiles_seen": None,
                 "backend": None, "mode_ran": None, "warnings": []}
        if isinstance(method, str):
            rec = Record(name, n, d, v, regime, dtype, status={"all": method})
        else:
            rec = Record(method.name, n, d, v, regime, dtype, description=method.description,
                         grads_mb=(n * d + v * d) * e.element_size() / 1e6)
            t1 = time.perf_counter()
            if method.name.startswith("ours"):
                try:
                    extra.update(backend_that_runs(method.options, e, c, t))
                except Exception as exc:  # noqa: BLE001 - measure() below records the same failure per phase
                    extra["backend"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                free_cached(device)
            else:
                extra["backend"] = method.name
            measure(method, e, c, t, ref, rec, cfg)
            if ref is None and "errors" not in rec.status:
                rec.status["errors"] = f"skipped: fp32 ground truth {ref_status}"
            if fresh is not None and rec.status.get("fwdbwd") == "ok":
                try:
                    counter = fresh()
                    e_, c_ = e.detach().requires_grad_(True), c.detach().requires_grad_(True)
                    torch.autograd.grad(method.loss(e_, c_, t), (e_, c_))
                    stats = counter.stats()
                    extra.update(skipped_fraction=stats.skipped_fraction,
                                 max_row_dropped_mass=stats.max_row_dropped_mass, tiles_seen=stats.tiles_seen)
                    rec.status["filter_stats"] = "ok"
                except Exception as exc:  # noqa: BLE001
                    rec.status["filter_stats"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                finally:
                    free_cached(device)
            log.info("  %-34s %s ms, dE %s, skipped %s, backend %s (%.1fs)", rec.method, _f(rec.fwdbwd_ms, 2),
                     _e(rec.de_rel_err), _pct(extra["skipped_fraction"]), extra["backend"], time.perf_counter() - t1)
        row = _row(rec, **extra)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    del ref
    free_cached(device)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``x_speed``: fwd+bwd time over exact speed mode's on the same problem; ``x_compile``: over the compiled
    plain loss's (plain torch's where nothing was compiled). < 1 is faster."""
    by_regime: dict[str, list[dict]] = {}
    for r in rows:
        by_regime.setdefault(r["regime"], []).append(r)
    for group in by_regime.values():
        ms = {r["method"]: r.get("fwdbwd_ms") for r in group}
        speed = ms.get(SPEED_BASELINE)
        compiled_name = next((b for b in COMPILE_BASELINES if ms.get(b)), None)
        compiled = ms.get(compiled_name) if compiled_name else None
        for r in group:
            mine = r.get("fwdbwd_ms")
            r["x_speed"] = mine / speed if mine and speed else None
            r["x_compile"] = mine / compiled if mine and compiled else None
            r["compile_baseline"] = compiled_name


def _f(x: float | None, p: int) -> str:
    return "-" if x is None else f"{x:.{p}f}"


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _status(r: dict) -> str:
    bad = {k: s for k, s in r.get("status", {}).items() if s != "ok" and not s.startswith("skipped: fwd+bwd only")}
    return "; ".join(f"{k}: {s}" for k, s in bad.items())[:120] or "ok"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (regime, method)."""
    baseline = next((r.get("compile_baseline") for r in rows if r.get("compile_baseline")), None) or "torch.compile"
    out = ["| regime | method | backend (mode) | fwd+bwd ms | x exact speed | x " + baseline + " | peak MB | "
           "dE rel. err | dC rel. err | tiles skipped | max row dropped mass | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        backend = r.get("backend") or "-"
        if r.get("mode_ran") and r.get("backend") in ("torch", "triton"):
            backend += f" ({r['mode_ran']})"
        if any("torch path" in w for w in r.get("warnings", [])):
            backend += " [fallback warned]"
        out.append(
            f"| {r['regime']} | {r['method']} | {backend} | {_f(r.get('fwdbwd_ms'), 2)} | {_f(r.get('x_speed'), 2)} | "
            f"{_f(r.get('x_compile'), 2)} | {_f(r.get('fwdbwd_mb'), 0)} | {_e(r.get('de_rel_err'))} | "
            f"{_e(r.get('dc_rel_err'))} | {_pct(r.get('skipped_fraction'))} | {_e(r.get('max_row_dropped_mass'))} | "
            f"{_status(r)} |")
    return "\n".join(out)


def write_json(path: Path, env: dict, config: dict, rows: list[dict]) -> None:
    """Atomically (a killed run leaves the previous complete file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "config": config, "rows": rows}, indent=1, default=str))
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON written by :func:`write_json` (missing file: none)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Per regime: fwd+bwd ms per method (bars) and dE relative error (dots, log scale). False (and a log line)
    when matplotlib is missing or the plot fails: the JSON and the table are the results, the plot a view."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot written")
        return False
    try:
        regimes = list(dict.fromkeys(r["regime"] for r in rows))
        fig, axes = plt.subplots(2, len(regimes), figsize=(4.2 * len(regimes) + 1, 8), squeeze=False)
        for k, regime in enumerate(regimes):
            group = [r for r in rows if r["regime"] == regime]
            names = [r["method"].replace("ours[", "ours\n[") for r in group]
            ms = [r.get("fwdbwd_ms") or 0.0 for r in group]
            colors = ["tab:orange" if r.get("filter_eps") else "tab:blue" for r in group]
            ax = axes[0][k]
            ax.bar(range(len(group)), ms, color=colors)
            for i, r in enumerate(group):
                if r.get("skipped_fraction") is not None:
                    ax.text(i, ms[i], f"{100 * r['skipped_fraction']:.0f}%", ha="center", va="bottom", fontsize=7)
            ax.set_title(f"{regime}: fwd+bwd ms (label: tiles skipped)", fontsize=9)
            ax.set_xticks(range(len(group)), names, rotation=80, fontsize=6)
            ax = axes[1][k]
            errs = [(i, r.get("de_rel_err"), r.get("dc_rel_err")) for i, r in enumerate(group)]
            ax.scatter([i for i, de, _ in errs if de], [de for _, de, _ in errs if de], label="dE", marker="o")
            ax.scatter([i for i, _, dc in errs if dc], [dc for _, _, dc in errs if dc], label="dC", marker="x")
            if any(de for _, de, _ in errs) or any(dc for _, _, dc in errs):
                ax.set_yscale("log")
            ax.set_title(f"{regime}: relative error vs fp32", fontsize=9)
            ax.set_xticks(range(len(group)), names, rotation=80, fontsize=6)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True
    except Exception as exc:  # noqa: BLE001 - never lose a run's numbers to its figure
        log.warning("plot failed (%s: %s): no plot written", type(exc).__name__, exc)
        return False


def parse_eps(text: str) -> list[float]:
    """``"2^-12,2^-10"`` or ``"0.000244,1e-3"`` -> floats; "" or "none" -> no filtered cells."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.lower() == "none":
            continue
        out.append(2.0 ** float(item[2:]) if item.startswith("2^") else float(item))
    return out


def common_parser(description: str) -> argparse.ArgumentParser:
    """Options shared with ``filter_trained.py``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eps", type=parse_eps, default=list(DEFAULT_EPS),
                   help="filter_eps values, comma-separated (2^-12 style or numbers); default 2^-12,2^-10")
    p.add_argument("--filter-modes", default=",".join(FILTER_MODES), help="modes of the filtered cells")
    p.add_argument("--methods", default=None,
                   help="exact methods (methods.build specs, comma-separated); default: ours in auto/speed/memory, "
                        "torch.compile and apple's cce on CUDA (torch on CPU)")
    p.add_argument("--vocab-order", default=None, type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
                   help="filter_vocab_order values, comma-separated (e.g. mean_logit,natural): the filtered cells for "
                        "each (only where the op has the option; cells are skipped, with the reason, where it has "
                        "not). Default: the op's default, not passed")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=50.0, help="timing budget per cell (do_bench's rep)")
    p.add_argument("--cpu-repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("outputs/filter"))
    p.add_argument("--no-png", action="store_true")
    return p


def exact_specs(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.methods:
        return M.split_specs(args.methods)
    return list(EXACT_CUDA if device.type == "cuda" else EXACT_CPU)


def finish(rows: list[dict], env: dict, config: dict, out: Path, name: str, png: bool) -> None:
    """Final JSON (with ratios), the table printed, and the plot."""
    write_json(out / f"{name}.json", env, config, rows)
    print(f"{env.get('device')}; torch {env.get('torch')}; {config}")
    print(table(rows))
    if png and plot(rows, out / f"{name}.png", f"filter_eps vs exact, {config.get('shape', '')} ({env.get('device')})"):
        print(f"wrote {out / f'{name}.png'}")
    print(f"wrote {out / f'{name}.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help=f"tokens (default {PAPER_SHAPE[0]} on CUDA, {TINY_SHAPE[0]} on CPU)")
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="filter_bench")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    default = PAPER_SHAPE if device.type == "cuda" else TINY_SHAPE
    n, d, v = (args.n or default[0], args.d or default[1], args.v or default[2])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    env = environment(device)
    config = {"shape": f"N={n} D={d} V={v} {args.dtype}", "eps": args.eps, "vocab_order": args.vocab_order,
              "op_has_filter_vocab_order": op_has("filter_vocab_order"), "rep_ms": args.rep_ms}
    rows: list[dict] = []
    path = args.out / f"{args.name}.json"

    def checkpoint(row: dict) -> None:
        rows.append(row)
        write_json(path, env, config, rows)

    built: dict = {}
    for regime in filter(None, (s.strip() for s in args.regimes.split(","))):
        e, c, t = make_inputs(regime, n, d, v, device=device, dtype=dtype, seed=args.seed)
        measure_problem(e, c, t, regime, exact=exact_specs(args, device), eps_values=args.eps,
                        filter_modes=[m for m in args.filter_modes.split(",") if m],
                        vocab_orders=args.vocab_order or [None], warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        cpu_repeats=args.cpu_repeats, on_row=checkpoint, built=built)
        add_ratios(rows)
        write_json(path, env, config, rows)
        del e, c, t
        free_cached(device)
    finish(rows, env, config, args.out, args.name, not args.no_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
