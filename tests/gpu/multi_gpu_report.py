"""Tables and the loss-curve plot of the 2-GPU run (tests/gpu/multi_gpu.sh), for BENCHMARKS.md.

    python tests/gpu/multi_gpu_report.py recipes IN [IN ...] OUT_DIR   # merge recipe runs -> recipes.json, curves.png
    python tests/gpu/multi_gpu_report.py tables DIR                    # markdown from DIR's JSON files

``recipes`` takes directories of per-run JSONs (tests/distributed_recipe.py's, named MODEL-LAYOUT-cce_BOOL.json)
or earlier recipes.json files, so runs split over several device calls merge into one table and one plot.
Each run is compared with the single-GPU stock run of the same model (the reference curve) and with the same
layout's other use_cce setting: max and mean per-step |loss difference|.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_runs(inputs: list[Path]) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for path in inputs:
        if path.is_dir():
            for f in sorted(path.glob("*.json")):
                runs[f.stem] = json.loads(f.read_text())
        elif path.exists():
            runs.update(json.loads(path.read_text()))
    return runs


def _split(name: str) -> tuple[str, str, str]:
    model, layout, cce = name.rsplit("-", 2)
    return model, layout, cce.removeprefix("cce_")


def _diff(a: list[float], b: list[float]) -> tuple[float, float] | None:
    n = min(len(a), len(b))
    if not n:
        return None
    d = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
    return max(d), sum(d) / n


def _first_and_median(seconds: list[float]) -> str:
    """``first s | median ms of the rest``: the first step pays kernel compilation, the rest is the steady state."""
    if not seconds:
        return "- | -"
    rest = sorted(seconds[1:])
    median = rest[len(rest) // 2] * 1e3 if rest else None
    return f"{seconds[0]:.2f} | {'-' if median is None else f'{median:.1f}'}"


def recipe_table(runs: dict[str, dict]) -> str:
    lines = ["| model | layout | use_cce | ranks | wrapper | steps | final loss | vs single-GPU stock: max / mean "
             "| vs same layout, other use_cce: max / mean | peak memory per GPU (GiB) | train time (s) "
             "| first step (s) | median later step (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---:|---:|"]
    for name in sorted(runs):
        run = runs[name]
        model, layout, cce = _split(name)
        ref = runs.get(f"{model}-single-cce_false", {}).get("losses", [])
        other = runs.get(f"{model}-{layout}-cce_{'false' if cce == 'true' else 'true'}", {}).get("losses", [])
        vs_ref, vs_other = _diff(run["losses"], ref), _diff(run["losses"], other)
        fmt = lambda d: f"{d[0]:.2e} / {d[1]:.2e}" if d else "-"  # noqa: E731
        peaks = [p for p in run.get("peak_memory_gib_per_rank", []) if p is not None]
        lines.append(
            f"| {model} | {layout} | {cce} | {run['world_size']} | {run['model_wrapped']} | {run['global_step']} "
            f"| {run['losses'][-1]:.4f} | {fmt(vs_ref)} | {fmt(vs_other)} "
            f"| {' / '.join(f'{p:.1f}' for p in peaks) or '-'} | {run.get('train_runtime_s') or '-'} "
            f"| {_first_and_median(run.get('step_seconds') or [])} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png")
        return False
    models = sorted({_split(n)[0] for n in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for name in sorted(n for n in runs if _split(n)[0] == model):
            _, layout, cce = _split(name)
            losses = runs[name]["losses"]
            ax.plot(range(1, len(losses) + 1), losses, label=f"{layout}, use_cce={cce}",
                    linestyle="-" if cce == "true" else "--", linewidth=1)
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def tables(directory: Path) -> str:
    import distributed_cases

    parts = []
    cases = directory / "cases.json"
    if cases.exists():
        with tempfile.TemporaryDirectory() as scratch:  # markdown() reads one file per suite
            for suite, data in json.loads(cases.read_text()).items():
                (Path(scratch) / f"{suite}.json").write_text(json.dumps(data))
            parts.append("### Workers on NCCL (tests/distributed_cases.py)\n" + distributed_cases.markdown(Path(scratch)))
    vp = directory / "vp.json"
    if vp.exists():
        data = json.loads(vp.read_text())
        w, shape = data["worst_over_ranks"], data["shape"]
        parts.append(
            f"### Vocab-parallel CCE, {data['world_size']} x {data['device']} vs one GPU (N={shape['n']}, "
            f"D={shape['d']}, V={shape['v']}, {shape['dtype']}; torch {data['versions']['torch']}, {data['date']})\n\n"
            "| | loss | dE | dC (own rows) | fwd+bwd ms | peak MiB above inputs |\n|---|---|---|---|---|---|\n"
            f"| single GPU | - | - | - | {w['single_gpu_ms']:.1f} | {w['single_gpu_peak_mib_above_inputs']} |\n"
            f"| vocab-parallel (worst rank) | {w['loss_vs_single_gpu']:.1e} | {w['dE_vs_single_gpu']:.1e} "
            f"| {w['dC_rows_vs_single_gpu']:.1e} | {w['vocab_parallel_ms']:.1f} "
            f"| {w['vocab_parallel_peak_mib_above_inputs']} |"
        )
    head = directory / "fsdp_head.json"
    if head.exists():
        data = json.loads(head.read_text())
        rows = ["| | step ms (rank 0) | peak GiB per rank | losses (rank 0) |", "|---|---|---|---|"]
        for i, label in enumerate(("stock", "ours")):
            per_rank = [r[i] for r in data["ranks"]]
            rows.append(f"| {label} | {per_rank[0]['step_ms_median']:.1f} | "
                        f"{' / '.join(str(round(r['peak_gib'], 2)) if r['peak_gib'] else '-' for r in per_rank)} | "
                        f"{', '.join(f'{x:.3f}' for x in per_rank[0]['losses'])} |")
        parts.append(f"### FSDP2, {data['arch']} at {data['layers']} layers, {data['tokens_per_gpu']} tokens per GPU, "
                     f"{data['world_size']} x {data['device']}, {data['dtype']} ({data['date']})\n\n" + "\n".join(rows))
    recipes = directory / "recipes.json"
    if recipes.exists():
        parts.append("### The Alpaca recipe through accelerate launch\n\n" + recipe_table(json.loads(recipes.read_text())))
    return "\n\n".join(parts)


def main(argv: list[str]) -> None:
    if argv[0] == "recipes":
        *inputs, out = (Path(a) for a in argv[1:])
        runs = load_runs(inputs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipes.json").write_text(json.dumps(runs, indent=1))
        plot(runs, out / "curves.png")
        print(recipe_table(runs))
    elif argv[0] == "tables":
        print(tables(Path(argv[1])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
