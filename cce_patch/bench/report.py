"""Benchmark outputs: environment header, markdown table, JSON, PNG plot.

``python -m cce_patch.bench.report RESULTS.json [--out DIR]`` re-renders the table and the plot from a JSON
written earlier (e.g. one fetched from the GPU machine), so figures never need a second GPU run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("cce_patch.bench")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device, argv: Sequence[str] | None = None) -> dict:
    """Everything needed to reproduce or compare a run: device, versions, date, exact command."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    argv = list(sys.argv if argv is None else argv)
    return {
        "device": dev_name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cce_patch": _version("cce_patch"),
        "git_commit": _git_commit(),
        "cut-cross-entropy": _version("cut-cross-entropy"),
        "liger-kernel": _version("liger-kernel"),
        "trl": _version("trl"),
    }


def header_lines(env: dict) -> list[str]:
    keys = (
        "device",
        "date",
        "torch",
        "cuda",
        "triton",
        "transformers",
        "cce_patch",
        "git_commit",
        "cut-cross-entropy",
        "liger-kernel",
        "trl",
    )
    parts = [f"{k} {env[k]}" for k in keys if env.get(k)]
    return [f"<!-- {', '.join(parts)} -->", f"`{env.get('command', '')}`", ""]


def _num(x: float | None, digits: int) -> str:
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _err(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def _mem(x: float | None, device_is_cuda: bool) -> str:
    if x is None:
        return "-" if device_is_cuda else "n/a"
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _status(rec: dict) -> str:
    bad = {k: s for k, s in rec["status"].items() if s != "ok"}
    if not bad:
        return "ok"
    if "all" in bad:
        return bad["all"]
    return "; ".join(f"{k}: {s}" for k, s in bad.items())


def markdown_table(results: list[dict], env: dict, config: dict | None = None) -> str:
    """One row per (shape, regime, method), with the environment header above it; in a heads run (records
    named by head) the per-head tables first, since they are what such a run is for."""
    cuda = not str(env.get("device", "")).startswith("CPU")
    lines = header_lines(env)
    if any(r.get("head") for r in results):
        lines += [*heads_tables(results, (config or {}).get("baseline", "torch.compile"), cuda), "", "All records:", ""]
    lines.append(
        "| method | N | D | V | regime | fwd ms | fwd MB | fwd+bwd ms | fwd+bwd MB | grads MB "
        "| dE rel.err | dC rel.err | status |"
    )
    lines.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        lines.append(
            f"| {r['method']} | {r['n']} | {r['d']} | {r['v']} | {r['regime']} | {_num(r['fwd_ms'], 2)} "
            f"| {_mem(r['fwd_mb'], cuda)} | {_num(r['fwdbwd_ms'], 2)} | {_mem(r['fwdbwd_mb'], cuda)} "
            f"| {_mem(r['grads_mb'], True)} | {_err(r['de_rel_err'])} | {_err(r['dc_rel_err'])} "
            f"| {_status(r)} |"
        )
    for shape in dict.fromkeys((r["n"], r["d"], r["v"]) for r in results):
        rows = [r for r in results if (r["n"], r["d"], r["v"]) == shape]
        if len({r["regime"] for r in rows}) > 1:
            lines += ["", *compact_table(rows, cuda)]
    return "\n".join(lines) + "\n"


def compact_table(rows: list[dict], cuda: bool) -> list[str]:
    """ANCHORS.md's layout for one shape: one row per method, fwd+bwd time per regime side by side, memory
    as the max over regimes (and its ratio to the gradients' own size), errors in the last regime (``lm``
    when present: where filtering errs most)."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    err_regime = "lm" if "lm" in regimes else regimes[-1]
    n, d, v = rows[0]["n"], rows[0]["d"], rows[0]["v"]
    out = [
        f"N={n}, D={d}, V={v}:",
        "",
        f"| method | fwd ms | fwd MB | fwd+bwd ms {' / '.join(regimes)} | fwd+bwd MB | × grads "
        f"| dE rel.err {err_regime} | dC rel.err {err_regime} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        by = {r["regime"]: r for r in rows if r["method"] == m}
        first = by[regimes[0]] if regimes[0] in by else next(iter(by.values()))
        mems = [r["fwdbwd_mb"] for r in by.values() if r["fwdbwd_mb"] is not None]
        fwd_mbs = [r["fwd_mb"] for r in by.values() if r["fwd_mb"] is not None]
        mem = max(mems) if mems else None
        ratio = f"{mem / first['grads_mb']:.2f}" if mem is not None and first["grads_mb"] else "-"
        times = " / ".join(
            "OOM"
            if g in by and "OOM" in by[g]["status"].values()
            else _num(by.get(g, {}).get("fwdbwd_ms"), 1)
            for g in regimes
        )
        er = by.get(err_regime, {})
        out.append(
            f"| {m} | {_num(first['fwd_ms'], 1)} | {_mem(max(fwd_mbs) if fwd_mbs else None, cuda)} | {times} "
            f"| {_mem(mem, cuda)} | {ratio} | {_err(er.get('de_rel_err'))} | {_err(er.get('dc_rel_err'))} |"
        )
    return out


#: The floor's unit: the method timing one e @ c.T GEMM (forward only). A loss's fwd+bwd does at least three
#: GEMMs of that size (logits, dE, dC), so 3x its time is what no fused loss can beat.
FLOOR_METHOD = "gemm"


def _reference(methods: list[str]) -> str | None:
    """The method the ratios are for: plain ``ours`` (the op's default, as users get it), else the first
    ``ours[...]`` of the run."""
    if "ours" in methods:
        return "ours"
    return next((m for m in methods if m.startswith("ours")), None)


def _fwdbwd_cell(rec: dict | None, cuda: bool) -> str:
    """``ms / MB`` of one record, or why there is none (OOM, error, skipped)."""
    if rec is None:
        return "-"
    st = rec["status"]
    if "all" in st:
        return "skipped"
    if rec["fwdbwd_ms"] is None:
        phase = st.get("fwdbwd", "")
        return "OOM" if phase == "OOM" else ("error" if phase.startswith("error") else "-")
    mem = "OOM" if st.get("fwdbwd_mem") == "OOM" else _mem(rec["fwdbwd_mb"], cuda)
    return f"{_num(rec['fwdbwd_ms'], 2)} / {mem}"


def _ratio(a: float | None, b: float | None, missing: str = "-") -> str:
    return f"{a / b:.2f}" if a is not None and b else missing


def _floor_ms(rec: dict | None) -> float | None:
    return 3 * rec["fwd_ms"] if rec is not None and rec.get("fwd_ms") is not None else None


def heads_tables(results: list[dict], baseline: str, cuda: bool) -> list[str]:
    """Per head: one row per N; per method fwd+bwd ms / MB above the inputs; the 3-GEMM floor; ours over
    ``baseline`` (time, memory) and over the floor. Methods skipped at every N of a head are named below its
    table instead of taking a column."""
    floor = FLOOR_METHOD
    out = [
        f"Per head: fwd+bwd ms / MB above the inputs per method; OOM = out of memory at that N. 3-GEMM floor = 3 x "
        f"the time of one e @ c.T GEMM (N x D x V, `{floor}`): a fused loss does at least three such GEMMs.",
    ]
    groups = dict.fromkeys((r.get("head") or f"{r['d']}x{r['v']}", r["d"], r["v"], r["regime"]) for r in results)
    for head, d, v, regime in groups:
        rows = [r for r in results if (r["d"], r["v"], r["regime"]) == (d, v, regime)]
        by = {(r["method"], r["n"]): r for r in rows}
        ns = sorted({r["n"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != floor))
        skipped: dict[str, str] = {}
        for m in methods:
            recs = [by[m, n] for n in ns if (m, n) in by]
            if recs and all("all" in r["status"] for r in recs):
                skipped[m] = _status(recs[0])
        shown = [m for m in methods if m not in skipped]
        ours = _reference(shown)
        has_floor = any(r["method"] == floor for r in rows)
        has_base = baseline in shown
        cols = list(shown)
        if has_floor:
            cols.append("3-GEMM floor ms")
        if ours and has_base and ours != baseline:
            cols += [f"{ours} / {baseline} ms", f"{ours} / {baseline} MB"]
        if ours and has_floor:
            cols.append(f"{ours} / 3-GEMM floor")
        out += ["", f"### {head}: D={d}, V={v}, regime {regime}", "", "| N | " + " | ".join(cols) + " |",
                "|---:|" + "---:|" * len(cols)]
        for n in ns:
            cells = [_fwdbwd_cell(by.get((m, n)), cuda) for m in shown]
            fl = by.get((floor, n))
            floor_ms = _floor_ms(fl)
            if has_floor:
                cells.append(_num(floor_ms, 2) if floor_ms is not None else _floor_status(fl))
            o, b = by.get((ours, n), {}), by.get((baseline, n), {})
            if ours and has_base and ours != baseline:
                cells.append(_ratio(o.get("fwdbwd_ms"), b.get("fwdbwd_ms")))
                cells.append(_ratio(o.get("fwdbwd_mb"), b.get("fwdbwd_mb"), "-" if cuda else "n/a"))
            if ours and has_floor:
                cells.append(_ratio(o.get("fwdbwd_ms"), floor_ms))
            out.append(f"| {n:,} | " + " | ".join(cells) + " |")
        if skipped:
            out += ["", "Not run: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()) + "."]
    return out


def _floor_status(rec: dict | None) -> str:
    """Why the floor has no number at this N."""
    if rec is None:
        return "-"
    st = rec["status"]
    return "OOM" if st.get("fwd") == "OOM" else ("skipped" if "all" in st else "error" if rec["fwd_ms"] is None else "-")


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` whole (write beside it, then rename): a run killed mid-write leaves the previous
    checkpoint, never a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, env: dict, config: dict, results: list[dict]) -> None:
    _write_text(path, json.dumps({"environment": env, "config": config, "results": results}, indent=1) + "\n")


def write_partial(out: Path, name: str, env: dict, config: dict, results: list[dict]) -> None:
    """The checkpoint after each record: ``<name>.json`` (marked partial) and ``<name>.md`` with the records so
    far. The plot is drawn at the end only (``cce-patch report <name>.json`` draws one from a partial run)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", env, {**config, "partial": True}, results)
    _write_text(out / f"{name}.md", markdown_table(results, env, config)
                + f"\n(partial: {len(results)} records when written; the run had not finished)\n")


def plot(results: list[dict], env: dict, path: Path, config: dict | None = None) -> bool:
    """Heads runs: see ``heads_plot``. Scaling runs (several N at one D, V): time and memory vs N, one line per
    method. Otherwise grouped bars of fwd+bwd time and memory per (shape, regime). Returns False (and logs
    why) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot written (pip install 'cce_patch[bench]')")
        return False
    if any(r.get("head") for r in results):
        return heads_plot(results, env, path, (config or {}).get("baseline", "torch.compile"), plt)
    methods = list(dict.fromkeys(r["method"] for r in results))
    dv = {(r["d"], r["v"]) for r in results}
    ns = sorted({r["n"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    title = f"{env.get('device', '')} — torch {env.get('torch')}, triton {env.get('triton')}"
    if len(dv) == 1 and len(ns) > 1:
        d, v = next(iter(dv))
        regimes = sorted({r["regime"] for r in results})
        for m in methods:
            for key, ax in (("fwdbwd_ms", axes[0]), ("fwdbwd_mb", axes[1])):
                pts = sorted(
                    (r["n"], r[key])
                    for r in results
                    if r["method"] == m and r[key] is not None and r["regime"] == regimes[0]
                )
                if pts:
                    ax.plot(*zip(*pts, strict=False), marker="o", label=m)
        for ax, ylabel in zip(axes, ("fwd+bwd ms", "fwd+bwd peak MB above inputs"), strict=False):
            ax.set_xscale("log", base=2)
            if ax.lines:
                ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_title(f"D={d}, V={v}, regime {regimes[0]}")
        axes[0].legend(fontsize=8)
        if not axes[1].lines:
            axes[1].text(0.5, 0.5, "memory not measured on CPU", ha="center", transform=axes[1].transAxes)
    else:
        groups = list(dict.fromkeys((r["n"], r["d"], r["v"], r["regime"]) for r in results))
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            by = {(r["n"], r["d"], r["v"], r["regime"]): r for r in results if r["method"] == m}
            for key, ax in (("fwdbwd_ms", axes[0]), ("fwdbwd_mb", axes[1])):
                ys = [(by[g][key] if g in by and by[g][key] is not None else 0.0) for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], ys, width, label=m)
        labels = [f"{n}x{d}x{v}\n{reg}" for n, d, v, reg in groups]
        for ax, ylabel in zip(axes, ("fwd+bwd ms", "fwd+bwd peak MB above inputs (log)"), strict=False):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        if any(r["fwdbwd_mb"] for r in results):
            axes[1].set_yscale("log")
        else:
            axes[1].text(0.5, 0.5, "memory not measured on CPU", ha="center", transform=axes[1].transAxes)
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heads_plot(results: list[dict], env: dict, path: Path, baseline: str, plt) -> bool:
    """A grid, one column per head: fwd+bwd time over ``baseline``'s vs N per method, with the 3-GEMM floor
    (dashed), above the peak memory over ``baseline``'s. Ratios, not ms, because the question per head is
    "at or under the baseline?", and a line at 1 answers it at a glance for heads of very different sizes."""
    from matplotlib.ticker import FuncFormatter

    groups = list(dict.fromkeys((r.get("head") or f"{r['d']}x{r['v']}", r["d"], r["v"]) for r in results))
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m not in (FLOOR_METHOD, baseline)]
    fig, axes = plt.subplots(2, len(groups), figsize=(3.4 * len(groups) + 1, 6.5), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for col, (head, d, v) in enumerate(groups):
        rows = [r for r in results if (r["d"], r["v"]) == (d, v)]
        by = {(r["method"], r["n"]): r for r in rows}
        ns = sorted({r["n"] for r in rows})
        top, bottom = axes[0][col], axes[1][col]
        for key, ax in (("fwdbwd_ms", top), ("fwdbwd_mb", bottom)):
            for m in methods:
                pts = [(n, by[m, n][key] / by[baseline, n][key]) for n in ns
                       if (m, n) in by and (baseline, n) in by and by[m, n][key] is not None
                       and by[baseline, n][key]]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", color=colors[m], label=m)
            if key == "fwdbwd_ms":
                floor = [(n, _floor_ms(by[FLOOR_METHOD, n]) / by[baseline, n][key]) for n in ns
                         if (FLOOR_METHOD, n) in by and (baseline, n) in by
                         and _floor_ms(by[FLOOR_METHOD, n]) is not None and by[baseline, n][key]]
                if floor:
                    ax.plot(*zip(*floor, strict=True), "k--", label="3-GEMM floor")
                ooms = [f"{m} @ {n:,}" for m in methods + [baseline] for n in ns
                        if (m, n) in by and by[m, n]["status"].get("fwdbwd") == "OOM"]
                if ooms:
                    ax.text(0.02, 0.02, "OOM: " + ", ".join(ooms), transform=ax.transAxes, fontsize=6, va="bottom")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
            ax.grid(True, alpha=0.3)
            ax.set_xlim(ns[0] / 1.4, ns[-1] * 1.4)
            ax.set_xlabel("N tokens")
            if len(ax.lines) > 1:
                ax.set_yscale("log")  # ratios of 0.5 and 2 equally far from the line at 1
                plain = FuncFormatter(lambda y, _: f"{y:g}")  # 0.6, 2: not 6x10^-1
                ax.yaxis.set_major_formatter(plain)
                lo, hi = ax.get_ylim()
                if hi < 10 * lo:  # within a decade (GPU ratios, ~0.3-2): label the minor ticks too
                    ax.yaxis.set_minor_formatter(plain)
            else:  # only the line at 1: nothing measured against the baseline
                why = "memory not measured on CPU" if key == "fwdbwd_mb" and not any(
                    r["fwdbwd_mb"] for r in rows) else f"no {baseline} numbers"
                ax.text(0.5, 0.5, why, ha="center", transform=ax.transAxes, fontsize=8)
        top.set_title(f"{head}\nD={d}, V={v}", fontsize=9)
        if col == 0:
            top.set_ylabel(f"fwd+bwd time / {baseline}")
            bottom.set_ylabel(f"peak MB above inputs / {baseline}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle(f"{env.get('device', '')} — torch {env.get('torch')}, triton {env.get('triton')}; "
                 f"regime {results[0]['regime']}, ratios to {baseline}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(
    out: Path, name: str, env: dict, config: dict, results: list[dict], *, png: bool = True
) -> dict:
    """Write ``<name>.md``, ``<name>.json`` and (if ``png``) ``<name>.png`` under ``out``; return paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{name}.md", "json": out / f"{name}.json"}
    _write_text(paths["md"], markdown_table(results, env, config))
    write_json(paths["json"], env, config, results)
    if png and plot(results, env, out / f"{name}.png", config):
        paths["png"] = out / f"{name}.png"
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cce_patch.bench.report",
        description="Re-render the table and plot of benchmark JSONs (several are merged, e.g. the parts "
        "of a preset run over several calls; the first one's environment heads the table).",
    )
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside the first JSON)")
    p.add_argument("--name", default=None, help="output file stem (default: the first JSON's)")
    args = p.parse_args(argv)
    datas = [json.loads(path.read_text()) for path in args.json]
    env = datas[0]["environment"]
    config = datas[0].get("config", {})  # a heads run's baseline
    results = [r for d in datas for r in d["results"]]
    out = args.out or args.json[0].parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.json[0].stem
    table = markdown_table(results, env, config)
    (out / f"{stem}.md").write_text(table)
    if len(datas) > 1:
        write_json(out / f"{stem}.json", env, {"merged_from": [str(a) for a in args.json]}, results)
    plot(results, env, out / f"{stem}.png", config)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
