"""The per-family report of ``family_runs.py``: each arm's step log summarised, compared with stock, written as
JSON, a markdown table and one PNG of the loss curves (arms overlaid).

    python recipes/family_report.py OUT_DIR [OUT_DIR ...]     # re-render from the step logs of several calls

A family's arms may come from several device calls (one arm per call when a call's time limit asks for it):
every ``<dir>/<family>/<arm>.steps.jsonl`` found under the directories given is read, a later directory's arm
replacing an earlier one's. Per arm: the loss curve, max and mean per-step |difference| to stock's loss at the
same steps, peak memory, median step time and tokens per second after the first ``SKIP`` steps, first-step time,
and whether the run finished (a cut run is reported with the steps it has).

The largest-batch probe (``family_runs.py --max-batch``, ``max_batch.py``) leaves ``<dir>/<family>/max_batch.jsonl``;
per arm its last search is shown in a second table: the largest per-device batch that fit at the YAML's length,
its peak memory, the smallest batch that ran out of memory, what ended the search (``oom``: the bracket is
exact; ``cap``: the limit given, not memory; ``error``/``timeout``/``cut``: a lower bound), and the ratio to
stock's largest batch (exact only where both searches ended at an OOM; ">=" where only stock's did).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

#: steps left out of the median step time and tokens/s (compilation, autotuning, allocator warm-up)
SKIP = 10
ARM_ORDER = ("stock", "use_cce", "torch_compile", "use_cce+torch_compile", "use_liger_kernel",
             "use_cce+use_liger_kernel")


def read_step_log(path: Path) -> dict:
    """The rows of one arm's step log (a torn last line, from a killed run, is ignored)."""
    steps: dict[int, dict] = {}
    losses: dict[int, float] = {}
    done = run = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "run" in row:
            run = row["run"]
        elif row.get("done"):
            done = row
        elif "loss" in row:
            losses[int(row["step"])] = float(row["loss"])
        elif "seconds" in row:
            steps[int(row["step"])] = row
    return {"steps": steps, "losses": losses, "done": done, "run": run}


def summarise(log: dict, skip: int = SKIP) -> dict:
    """One arm's numbers from its step log (see the module doc)."""
    ordered = [log["steps"][k] for k in sorted(log["steps"])]
    later = ordered[skip:] if len(ordered) > skip else []
    seconds = sum(r["seconds"] for r in later)
    tokens = (ordered[-1]["tokens_seen"] - ordered[skip - 1]["tokens_seen"]) if later and skip > 0 else None
    peaks = [r["peak_gib"] for r in ordered if r.get("peak_gib") is not None]
    if log["done"] and log["done"].get("peak_gib") is not None:
        peaks.append(log["done"]["peak_gib"])
    return {
        "steps": len(ordered),
        "finished": log["done"] is not None,
        "first_step_s": ordered[0]["seconds"] if ordered else None,
        "median_step_s": statistics.median(r["seconds"] for r in later) if later else None,
        "tokens_per_s": (tokens / seconds) if tokens and seconds > 0 else None,
        "peak_gib": max(peaks) if peaks else None,
        "losses": {str(k): v for k, v in sorted(log["losses"].items())},
        "run": log["run"],  # family_runs.py's record of the process (command, exit code), when it got to write it
        "error": None if log["run"] is None or log["run"].get("rc") == 0 else f"rc {log['run'].get('rc')}",
    }


def curve_difference(losses: dict[str, float], stock: dict[str, float]) -> dict | None:
    """Max and mean |loss - stock's loss| over the steps both logged."""
    common = [k for k in losses if k in stock]
    if not common:
        return None
    diffs = [abs(losses[k] - stock[k]) for k in common]
    return {"max": max(diffs), "mean": sum(diffs) / len(diffs), "steps": len(common)}


def family_report(arms: dict[str, dict]) -> dict[str, dict]:
    """Each arm's summary with its difference to stock's loss curve (when stock logged losses)."""
    stock = arms.get("stock", {}).get("losses")
    for name, summary in arms.items():
        summary["vs_stock"] = curve_difference(summary["losses"], stock) if stock and name != "stock" else None
    return arms


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def read_max_batch(path: Path) -> dict[str, dict]:
    """arm -> its last search in one ``max_batch.jsonl``: the probe's header, the candidates run, and the result;
    a search with no result line (killed) is summarised from its candidates, ended by ``cut``."""
    searches: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        arm = row.get("arm")
        if arm is None:
            continue
        if "probe" in row:  # a new search of this arm replaces an earlier one in the same file
            searches[arm] = {"probe": row["probe"], "candidates": [], "result": None}
        elif arm in searches and "candidate" in row:
            searches[arm]["candidates"].append(row["candidate"])
        elif arm in searches and "result" in row:
            searches[arm]["result"] = row["result"]
    out = {}
    for arm, search in searches.items():
        result = search["result"]
        if result is None:
            fit = [c for c in search["candidates"] if c["kind"] == "fits"]
            oom = [c["batch"] for c in search["candidates"] if c["kind"] == "oom"]
            best = max(fit, key=lambda c: c["batch"], default=None)
            result = {"largest": best["batch"] if best else 0, "smallest_failing": min(oom, default=None),
                      "bound": "cut", "peak_gib": best["peak_gib"] if best else None,
                      "detail": "the search was cut before it ended: the largest is a lower bound"}
        out[arm] = {**result, "probe": search["probe"], "candidates": search["candidates"]}
    return out


def max_batch_ratios(searches: dict[str, dict]) -> dict[str, dict]:
    """Each arm's largest batch over stock's: ``{"ratio": x, "kind": "exact" | "at least"}``, or None where it says
    nothing (no stock search, stock's not ended by an OOM, or no batch fit)."""
    stock = searches.get("stock")
    for name, search in searches.items():
        search["vs_stock"] = None
        if name == "stock" or not stock or stock["bound"] != "oom" or not stock["largest"] or not search["largest"]:
            continue
        search["vs_stock"] = {"ratio": search["largest"] / stock["largest"],
                              "kind": "exact" if search["bound"] == "oom" else "at least"}
    return searches


def markdown(family: str, arms: dict[str, dict], meta: dict, max_batch: dict[str, dict] | None = None) -> str:
    lines = [f"### {family}", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]
    if arms or not max_batch:
        lines += [f"| arm | steps | first step s | median step s (after {meta.get('skip', SKIP)}) | tokens/s | peak GiB "
                  "| loss first -> last | max / mean diff to stock |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for name in sorted(arms, key=_arm_order):
        s = arms[name]
        losses = list(s["losses"].values())
        first_last = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
        diff = s.get("vs_stock")
        shown = "-" if diff is None else f"{diff['max']:.4f} / {diff['mean']:.4f}"
        status = "" if s["finished"] else " (cut)"
        if s.get("error"):
            status = f" ({s['error']})"
        lines.append(f"| {name}{status} | {s['steps']} | {_f(s['first_step_s'], '.2f')} | "
                     f"{_f(s['median_step_s'], '.3f')} | {_f(s['tokens_per_s'], '.0f')} | {_f(s['peak_gib'], '.2f')} | "
                     f"{first_last} | {shown} |")
    if max_batch:
        lines += ["", *max_batch_markdown(max_batch)]
    return "\n".join(lines) + "\n"


def _arm_order(name: str) -> int:
    return ARM_ORDER.index(name) if name in ARM_ORDER else len(ARM_ORDER)


def max_batch_markdown(searches: dict[str, dict]) -> list[str]:
    """The largest-batch table, under what the probe measured (its header, once per distinct text)."""
    searches = max_batch_ratios(searches)
    measured = sorted({s["probe"].get("measured", "-") for s in searches.values()})
    devices = sorted({str(s["probe"].get("device", "-")) for s in searches.values()})
    lines = ["#### largest per-device batch", "", *(f"- measured: {m}" for m in measured),
             f"- device: {', '.join(devices)}", "",
             "| arm | largest batch | peak GiB at it | out of memory at | ended by | vs stock | candidates |",
             "|---|---:|---:|---:|---|---:|---|"]
    for name in sorted(searches, key=_arm_order):
        s = searches[name]
        ratio = s.get("vs_stock")
        shown = "-" if ratio is None else ((">= " if ratio["kind"] == "at least" else "") + f"{ratio['ratio']:.2f}x")
        ended = s["bound"] + (f" ({s['detail']})" if s.get("detail") and s["bound"] not in ("oom",) else "")
        tried = ", ".join(f"{c['batch']}:{c['kind']}" for c in s["candidates"])
        lines.append(f"| {name} | {s['largest']} | {_f(s['peak_gib'], '.2f')} | {s['smallest_failing'] or '-'} | "
                     f"{ended} | {shown} | {tried} |")
    return lines


def plot(family: str, arms: dict[str, dict], path: Path) -> bool:
    """The arms' loss curves overlaid; False when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = {name: s["losses"] for name, s in arms.items() if s["losses"]}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, losses in curves.items():
        ax.plot([int(k) for k in losses], list(losses.values()), label=name, linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{family}: Alpaca, shipped recipe, arms overlaid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def collect(dirs: list[Path]) -> dict[str, dict[str, dict]]:
    """family -> arm -> summary, from the step logs under ``dirs`` (a later directory's arm replaces an earlier's);
    the steps skipped in the medians are the family's ``meta.json``'s ``skip``."""
    found: dict[str, dict[str, dict]] = {}
    for root in dirs:
        for log_path in sorted(root.glob("*/*.steps.jsonl")):
            family, arm = log_path.parent.name, log_path.name.removesuffix(".steps.jsonl")
            meta_path = log_path.with_name("meta.json")
            skip = json.loads(meta_path.read_text()).get("skip", SKIP) if meta_path.is_file() else SKIP
            summary = summarise(read_step_log(log_path), skip)
            found.setdefault(family, {})[arm] = summary
    return found


def collect_max_batch(dirs: list[Path]) -> dict[str, dict[str, dict]]:
    """family -> arm -> its largest-batch search (``read_max_batch``), from ``<dir>/<family>/max_batch.jsonl``
    under ``dirs``; a later directory's search of an arm replaces an earlier one's."""
    found: dict[str, dict[str, dict]] = {}
    for root in dirs:
        for path in sorted(root.glob("*/max_batch.jsonl")):
            found.setdefault(path.parent.name, {}).update(read_max_batch(path))
    return found


def write_family(out: Path, family: str, arms: dict[str, dict], meta: dict,
                 max_batch: dict[str, dict] | None = None) -> list[Path]:
    """``<out>/<family>.json``, ``.md`` and ``.png`` (the PNG only with matplotlib); with the largest-batch
    searches, their table and ``"max_batch"`` in the JSON."""
    arms = family_report(arms)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{family}.json", out / f"{family}.md"]
    data = {"family": family, "meta": meta, "arms": arms}
    if max_batch:
        data["max_batch"] = max_batch_ratios(max_batch)
    written[0].write_text(json.dumps(data, indent=1) + "\n")
    written[1].write_text(markdown(family, arms, meta, max_batch))
    if plot(family, arms, out / f"{family}.png"):
        written.append(out / f"{family}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not dirs:
        print(__doc__)
        return 2
    runs, largest = collect(dirs), collect_max_batch(dirs)
    for family in sorted(set(runs) | set(largest)):
        arms, searches = runs.get(family, {}), largest.get(family)
        meta = {}
        for root in dirs:
            meta_path = root / family / "meta.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
        for path in write_family(dirs[-1], family, arms, meta, searches):
            print(path)
        print(markdown(family, family_report(arms), meta, searches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
