"""The end-to-end benchmark's outputs: a markdown table (and one of the max-tokens search when it ran), the
JSON of every record, and a PNG of the table (step time, peak memory, largest tokens per step)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..report import header_lines
from .measure import E2ERecord

log = logging.getLogger("cce_patch.bench")


def _f(x, p: int) -> str:
    return "-" if x is None else f"{x:.{p}f}"


def markdown(records: list[E2ERecord], env: dict) -> str:
    lines = header_lines(env)
    lines.append(
        "| model | variant | tokens | attn | loss | loss rel.diff | grad-norm rel.diff | peak GiB "
        "| GiB above weights | step ms | status |"
    )
    lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in records:
        lines.append(
            f"| {r.model} | {r.variant} | {r.batch}x{r.seq} | {r.attn} | {_f(r.loss, 4)} "
            f"| {_f(r.loss_rel_diff, 5)} | {_f(r.grad_norm_rel_diff, 4)} | {_f(r.peak_gib, 2)} "
            f"| {_f(r.above_weights_gib, 2)} | {_f(r.step_ms, 1)} | {r.status} |"
        )
    searched = [r for r in records if r.max_tokens]
    if searched:
        lines += ["", "Largest tokens per step that fit (forward + backward, gradient checkpointing, no optimizer "
                  "states; batch x seq at a fixed seq):", "",
                  "| model | variant | max tokens/step | batch x seq | vs stock | bound | fails at | probes | search s |",
                  "|---|---|---:|---|---:|---|---:|---:|---:|"]
        stock = {r.model: r.max_tokens["tokens"] for r in searched if r.variant == "stock" and r.max_tokens["tokens"]}
        for r in searched:
            m = r.max_tokens
            ratio = m["tokens"] / stock[r.model] if r.model in stock else None
            shown = f"≥ {m['tokens']:,}" if m["bound"] in ("cap", "time") else f"{m['tokens']:,}"
            fails = "-" if m["fails_at_tokens"] is None else f"{m['fails_at_tokens']:,}"
            lines.append(f"| {r.model} | {r.variant} | {shown} | {m['batch']}x{m['seq']} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | {m['bound']} | {fails} | "
                         f"{len(m['probes'])} | {m['seconds']:.0f} |")
    lines += _loop_lines(records) + _graph_break_lines(records)
    return "\n".join(lines) + "\n"


def curve_diff(losses: list[float], reference: list[float]) -> tuple[float, float] | None:
    """Max and mean per-step absolute difference of two loss curves (over their common steps)."""
    pairs = list(zip(losses, reference, strict=False))  # curves of different lengths: the common steps
    if not pairs:
        return None
    diffs = [abs(a - b) for a, b in pairs]
    return max(diffs), sum(diffs) / len(diffs)


def _loop_lines(records: list[E2ERecord]) -> list[str]:
    looped = [r for r in records if r.loop]
    if not looped:
        return []
    m = looped[0].loop
    lines = ["", f"Trainer loop: {m['steps']} AdamW steps of {m['batch']} sequences of {m['min_len']}-{m['max_len']} "
             "tokens padded to the longest, prompts masked; median and tokens/s after the warm-up steps, peak with "
             "optimizer states:", "",
             "| model | variant | first step ms | median step ms | tokens/s | peak GiB | loss first -> last "
             "| max / mean diff to stock |", "|---|---|---:|---:|---:|---:|---|---|"]
    stock = {r.model: r.loop["losses"] for r in looped if r.variant == "stock" and not r.compiled}
    for r in looped:
        loop = r.loop
        diff = curve_diff(loop["losses"], stock[r.model]) if r.model in stock else None
        shown = "-" if diff is None else f"{diff[0]:.4f} / {diff[1]:.4f}"
        first_last = f"{loop['losses'][0]:.4f} -> {loop['losses'][-1]:.4f}" if loop["losses"] else "-"
        lines.append(f"| {r.model} | {r.variant} | {_f(loop['first_step_ms'], 0)} | {_f(loop['median_step_ms'], 1)} "
                     f"| {_f(loop['tokens_per_s'], 0)} | {_f(loop['peak_gib'], 2)} | {first_last} | {shown} |")
    return lines


def _graph_break_lines(records: list[E2ERecord]) -> list[str]:
    compiled = [r for r in records if r.graph_breaks]
    if not compiled:
        return []
    lines = ["", "torch.compile: graphs and graph breaks of one forward (torch._dynamo.explain), so per step:", "",
             "| model | variant | graphs | graph breaks | where and why |", "|---|---|---:|---:|---|"]
    for r in compiled:
        g = r.graph_breaks
        if "error" in g:
            lines.append(f"| {r.model} | {r.variant} | - | - | explain failed: {g['error']} |")
            continue
        why = "<br>".join(x.replace("|", "\\|") for x in g["reasons"]) or "-"
        lines.append(f"| {r.model} | {r.variant} | {g['graphs']} | {g['graph_breaks']} | {why} |")
    return lines


def write_json(path: Path, env: dict, config: dict, records: list[E2ERecord], losses_agree: bool) -> None:
    path.write_text(json.dumps({"environment": env, "config": config, "losses_agree": losses_agree,
                                "results": [asdict(r) for r in records]}, indent=1, default=str) + "\n")


def plot(records: list[E2ERecord], env: dict, path: Path) -> bool:
    """Grouped bars per model: step ms, peak GiB and (when searched) max tokens per step, one bar per
    variant. Returns False (and logs why) if matplotlib is missing or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot written (pip install 'cce_patch[bench]')")
        return False
    models = list(dict.fromkeys(r.model for r in records))
    panels = [("step ms", lambda r: r.step_ms, "{:.0f}".format), ("peak GiB", lambda r: r.peak_gib, "{:.1f}".format),
              ("max tokens / step", lambda r: r.max_tokens["tokens"] if r.max_tokens else None, None)]
    panels = [p for p in panels if any(p[1](r) is not None for r in records)]
    variants = [v for v in dict.fromkeys(r.variant for r in records)
                if any(get(r) is not None for r in records if r.variant == v for _, get, _ in panels)]
    if not panels or not variants:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab10").colors
    for ax, (title, get, fmt) in zip(axes[0], panels, strict=True):
        for k, variant in enumerate(variants):
            xs, ys, labels = [], [], []
            for i, model in enumerate(models):
                rec = next((r for r in records if r.model == model and r.variant == variant), None)
                value = get(rec) if rec is not None else None
                if value is not None:
                    xs.append(i + (k - (len(variants) - 1) / 2) * width)
                    ys.append(value)
                    labels.append(fmt(value) if fmt else _tokens_label(rec.max_tokens))
            bars = ax.bar(xs, ys, width, label=variant, color=colors[k % len(colors)])
            ax.bar_label(bars, labels=labels, fontsize=7)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=8)
    r0 = records[0]
    fig.suptitle(f"one training step, {r0.batch}x{r0.seq} tokens, {r0.dtype}, gradient checkpointing — "
                 f"{env.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tokens_label(search: dict) -> str:
    """``32k``, or ``≥128k`` where the search stopped at its cap or its time budget (a lower bound)."""
    k = f"{search['tokens'] / 1024:.0f}k"
    return f"≥{k}" if search["bound"] in ("cap", "time") else k
