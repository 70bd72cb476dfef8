"""The Alpaca recipe with gradient filtering off and on, same seed and data, and the two loss curves compared.

    python recipes/filter_curves.py --out $OUT                                   # GPU: configs/gpu-smoke-qwen2.5.yaml, 300 steps
    python recipes/filter_curves.py --config configs/offline-tiny.yaml --steps 5 --launcher python   # CPU dry run
    python recipes/filter_curves.py --report OFF/trainer_state.json ON/trainer_state.json --out DIR    # report only

Issue 23's acceptance: "the Alpaca recipe with the filter on matches the curve with it off within bf16 noise: 300
steps of the Qwen2.5-0.5B architecture". Both runs are the recipe (``recipes/timed_finetune.py``: the unchanged
``finetune_alpaca.py`` with a per-step log, flushed as it goes) on CONFIG through ``accelerate launch
--num_processes 1`` (as ``tests/gpu/run_all.sh``'s finetune section runs it), with ``--max_steps``,
``--logging_steps 1`` (one logged loss per step, so the difference is per step), no final save, and the second
with ``--cce_config '{"filter_eps": EPS}'`` (the recipe's CCEConfig options; the Trainer logs what the filter
skipped as ``cce_filter_skipped_fraction``). Arguments after ``--`` go to both runs. ``--run-limit-s`` stops a
run that takes longer (its process group gets SIGTERM): the comparison then covers the steps both logs hold, so a
slow filtered run still gives a report inside the caller's time limit. Exit status: 0 both runs complete, 3 a
run stopped at the limit (the report covers fewer steps), 1 a run failed or nothing to compare.

What "within bf16 noise" means is measured in the same call: ``--baselines`` (default ``stock``) adds runs whose
difference from the filter-off run is noise, not filtering: ``stock`` trains with Transformers' own loss
(``--use_cce false``: another exact implementation, other roundings), ``repeat`` reruns filter-off unchanged
(what the GPU's run-to-run nondeterminism alone gives). The report's ``noise`` holds the same statistics for each,
and ``within_noise`` says whether the filtered run's max and mean per-step differences are at most the largest
baseline's.

The report (``filter_curves.json``, ``filter_curves.png`` when matplotlib imports, and a summary printed): max and
mean per-step |loss(on) - loss(off)|, the same over the last 10% of steps, each curve's last-10% mean, the
logged skipped fraction (mean, min, max), each run's median step time (steps after the 5th), and whether the
filtered run's log carries the op's "... takes the torch path" warning (then the two runs also differ in
backend, not only in filter). A stopped or failed run is compared over the steps its log holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "timed_finetune.py"
DEFAULT_CONFIG = ROOT / "configs" / "gpu-smoke-qwen2.5.yaml"
#: What the op's warning says when a filtered call leaves the fused kernels for the torch path (ops/backends.py).
FALLBACK_MARK = "takes the torch path"


def launch_command(launcher: str, python: str) -> list[str]:
    if launcher == "accelerate":
        return [python, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    return [python]


def run_one(label: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """One recipe run; its log goes to ``<scratch>/<label>.log`` and to this process's output."""
    out_dir = args.scratch / label
    step_log = args.scratch / f"{label}.jsonl"
    step_log.unlink(missing_ok=True)
    cmd = [*launch_command(args.launcher, args.python), str(RECIPE), "--step_log", str(step_log), str(args.config),
           "--max_steps", str(args.steps),
           "--logging_steps", str(args.logging_steps), "--save_final_model", "false", "--save_strategy", "no",
           "--output_dir", str(out_dir), "--seed", str(args.seed), "--report_to", "none"]
    if label == "filter_on":
        cmd += ["--cce_config", json.dumps({"filter_eps": args.eps})]
    elif label == "stock":
        cmd += ["--use_cce", "false"]
    cmd += extra
    args.scratch.mkdir(parents=True, exist_ok=True)
    log_path = args.scratch / f"{label}.log"
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    stopped = threading.Event()
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: a stop reaches the launcher's child

        def stop() -> None:
            stopped.set()
            print(f"[{label}] --run-limit-s {args.run_limit_s} reached: stopping the run", flush=True)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(20)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(args.run_limit_s, stop) if args.run_limit_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        for line in proc.stdout:
            log_file.write(line)
            sys.stdout.write(f"[{label}] {line}")
        rc = proc.wait()
        if timer is not None:
            timer.cancel()
    wall = time.perf_counter() - t0
    print(f"[{label}] rc={rc} in {wall:.0f} s{' (stopped at the run limit)' if stopped.is_set() else ''}", flush=True)
    return {"label": label, "rc": rc, "wall_s": round(wall, 1), "stopped_at_limit": stopped.is_set(),
            "state": str(out_dir / "trainer_state.json"), "step_log": str(step_log), "log": str(log_path),
            "fallback_warned": FALLBACK_MARK in log_path.read_text(errors="replace")}


def run_source(run: dict) -> Path:
    """The run's trainer_state.json when it finished, else its step log (what a stopped run leaves)."""
    state = Path(run["state"])
    return state if state.is_file() else Path(run["step_log"])


def curve(path: Path) -> dict[int, dict]:
    """step -> the logged entry holding its training loss, from a trainer_state.json (its log_history) or a
    ``timed_finetune.py`` step log (.jsonl)."""
    if not path.is_file():
        return {}
    if path.suffix == ".jsonl":
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        history = json.loads(path.read_text()).get("log_history", [])
    return {int(h["step"]): h for h in history if "loss" in h and "step" in h}


def median_step_s(step_log: Path, skip: int = 5) -> float | None:
    """Median wall time of the steps after the first ``skip`` (compilation, autotuning) in a step log."""
    if not step_log.is_file():
        return None
    rows = [json.loads(line) for line in step_log.read_text().splitlines() if line.strip()]
    times = [r["seconds"] for r in rows if "seconds" in r and r.get("step", 0) > skip]
    return statistics.median(times) if times else None


def compare(off_path: Path, on_path: Path) -> dict:
    """The numbers of the report (see the module doc)."""
    off, on = curve(off_path), curve(on_path)
    steps = sorted(set(off) & set(on))
    diffs = [abs(on[s]["loss"] - off[s]["loss"]) for s in steps]
    tail = steps[-max(1, len(steps) // 10):] if steps else []
    skipped = [on[s]["cce_filter_skipped_fraction"] for s in sorted(on) if "cce_filter_skipped_fraction" in on[s]]
    dropped = [on[s]["cce_filter_max_row_dropped_mass"] for s in sorted(on) if "cce_filter_max_row_dropped_mass" in on[s]]

    def mean(xs: list[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    return {
        "steps_off": len(off), "steps_on": len(on), "steps_compared": len(steps),
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": mean(diffs),
        "max_abs_diff_last10pct": max(abs(on[s]["loss"] - off[s]["loss"]) for s in tail) if tail else None,
        "mean_loss_last10pct_off": mean([off[s]["loss"] for s in tail]),
        "mean_loss_last10pct_on": mean([on[s]["loss"] for s in tail]),
        "first_loss_off": off[steps[0]]["loss"] if steps else None,
        "skipped_fraction_mean": mean(skipped),
        "skipped_fraction_min": min(skipped) if skipped else None,
        "skipped_fraction_max": max(skipped) if skipped else None,
        "max_row_dropped_mass_max": max(dropped) if dropped else None,
        "curve_off": [(s, off[s]["loss"]) for s in sorted(off)],
        "curve_on": [(s, on[s]["loss"]) for s in sorted(on)],
        "skipped_fraction": [(s, on[s]["cce_filter_skipped_fraction"]) for s in sorted(on)
                             if "cce_filter_skipped_fraction" in on[s]],
    }


def differences(off_path: Path, other_path: Path) -> dict:
    """Max and mean per-step |loss(other) - loss(off)|, overall and over the last 10% of the common steps."""
    off, other = curve(off_path), curve(other_path)
    steps = sorted(set(off) & set(other))
    diffs = [abs(other[s]["loss"] - off[s]["loss"]) for s in steps]
    tail = diffs[-max(1, len(diffs) // 10):] if diffs else []
    return {"steps_compared": len(steps), "max_abs_diff": max(diffs) if diffs else None,
            "mean_abs_diff": statistics.fmean(diffs) if diffs else None,
            "max_abs_diff_last10pct": max(tail) if tail else None,
            "curve": [(s, other[s]["loss"]) for s in steps]}


def within_noise(report: dict) -> bool | None:
    """Whether the filtered run differs from filter-off by no more than the noisiest baseline does (max and mean
    per-step difference), or None without a baseline that compared any step."""
    noise = [n for n in report.get("noise", {}).values() if n["steps_compared"]]
    if not noise or report["max_abs_diff"] is None:
        return None
    return (report["max_abs_diff"] <= max(n["max_abs_diff"] for n in noise)
            and report["mean_abs_diff"] <= max(n["mean_abs_diff"] for n in noise))


def plot(report: dict, path: Path, title: str) -> bool:
    """Both curves, their difference, and the skipped fraction; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return False
    fig, (top, mid, low) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for key, label in (("curve_off", "filter off"), ("curve_on", "filter on")):
        if report[key]:
            xs, ys = zip(*report[key], strict=True)
            top.plot(xs, ys, label=label, lw=1)
    top.set_ylabel("training loss")
    top.legend()
    top.set_title(title, fontsize=9)
    on = dict(report["curve_on"])
    diff = [(s, on[s] - y) for s, y in report["curve_off"] if s in on]
    if diff:
        xs, ys = zip(*diff, strict=True)
        mid.plot(xs, ys, lw=1, color="tab:red", label="filter on")
    for name, noise in report.get("noise", {}).items():
        other = dict(noise["curve"])
        base = [(s, other[s] - y) for s, y in report["curve_off"] if s in other]
        if base:
            xs, ys = zip(*base, strict=True)
            mid.plot(xs, ys, lw=0.8, alpha=0.7, label=f"{name} (noise)")
    mid.axhline(0, color="gray", lw=0.5)
    mid.set_ylabel("loss(x) - loss(off)")
    mid.legend(fontsize=7)
    if report["skipped_fraction"]:
        xs, ys = zip(*report["skipped_fraction"], strict=True)
        low.plot(xs, [100 * y for y in ys], lw=1, color="tab:green")
    low.set_ylabel("tiles skipped (%)")
    low.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(report: dict) -> str:
    def f(x, p=4):
        return "-" if x is None else f"{x:.{p}f}"

    dropped = report["max_row_dropped_mass_max"]
    noise = [f"  {name} vs off (noise): max {f(n['max_abs_diff'])}, mean {f(n['mean_abs_diff'])}, max over the last "
             f"10% {f(n['max_abs_diff_last10pct'])} ({n['steps_compared']} steps)"
             for name, n in report.get("noise", {}).items()]
    verdict = {True: "within the noise", False: "NOT within the noise", None: "no noise baseline"}[within_noise(report)]

    return "\n".join([
        f"steps compared: {report['steps_compared']} (off {report['steps_off']}, on {report['steps_on']})",
        f"|loss(on) - loss(off)| per step: max {f(report['max_abs_diff'])}, mean {f(report['mean_abs_diff'])}, "
        f"max over the last 10% {f(report['max_abs_diff_last10pct'])}",
        f"mean loss over the last 10%: off {f(report['mean_loss_last10pct_off'])}, on {f(report['mean_loss_last10pct_on'])}",
        f"cce_filter_skipped_fraction: mean {f(report['skipped_fraction_mean'])}, min "
        f"{f(report['skipped_fraction_min'])}, max {f(report['skipped_fraction_max'])}; largest row dropped mass "
        f"{'-' if dropped is None else format(dropped, '.2e')}",
        *noise,
        f"filter on vs off: {verdict}",
    ])


def write_report(report: dict, out: Path, title: str, png: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "filter_curves.json").write_text(json.dumps(report, indent=1))
    print(summary(report))
    if png and plot(report, out / "filter_curves.png", title):
        print(f"wrote {out / 'filter_curves.png'}")
    print(f"wrote {out / 'filter_curves.json'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the recipe's YAML")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eps", type=float, default=2.0**-12, help="filter_eps of the filtered run")
    p.add_argument("--logging-steps", dest="logging_steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", choices=("accelerate", "python"), default="accelerate")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/filter_curves")))
    p.add_argument("--scratch", type=Path, default=None, help="run folders and logs (default OUT/../filter_curves_runs)")
    p.add_argument("--report", nargs=2, type=Path, metavar=("OFF_STATE", "ON_STATE"),
                   help="only compare two trainer_state.json files")
    p.add_argument("--run-limit-s", type=float, default=0, help="stop a run after this many seconds (0: never)")
    p.add_argument("--baselines", default="stock",
                   help="comma-separated noise runs beside filter off/on: stock (Transformers' loss), repeat "
                   "(filter off again); '' for none")
    p.add_argument("--no-png", action="store_true")
    args = p.parse_args(argv)
    baselines = [b for b in args.baselines.split(",") if b]
    if unknown := sorted(set(baselines) - {"stock", "repeat"}):
        p.error(f"--baselines: unknown {unknown}; choose from stock, repeat")
    args.config = args.config if args.config.is_absolute() else (Path.cwd() / args.config)
    args.scratch = (args.scratch or Path("/tmp/cce_filter_curves")).resolve()
    args.out = args.out.resolve()
    if args.report:
        write_report(compare(*args.report), args.out, f"{args.report[0]} vs {args.report[1]}", not args.no_png)
        return 0
    runs = [run_one(label, args, extra) for label in ("filter_off", "filter_on", *baselines)]
    report = compare(run_source(runs[0]), run_source(runs[1]))
    report["noise"] = {run["label"]: differences(run_source(runs[0]), run_source(run)) for run in runs[2:]}
    report["within_noise"] = within_noise(report)
    for run in runs:
        run["median_step_s"] = median_step_s(Path(run["step_log"]))
        print(f"{run['label']}: median step {run['median_step_s']} s, {run['wall_s']} s in all")
    report.update(config=str(args.config), steps=args.steps, eps=args.eps, seed=args.seed, extra_args=extra, runs=runs)
    if runs[1]["fallback_warned"]:
        print(f"note: the filtered run's log says the op left the fused kernels ('{FALLBACK_MARK}'): the curves differ "
              "in backend as well as in the filter")
    write_report(report, args.out, f"{args.config.name}, {args.steps} steps, filter_eps={args.eps:g} vs off",
                 not args.no_png)
    if not report["steps_compared"]:
        return 1
    if any(r["stopped_at_limit"] for r in runs):
        print(f"PARTIAL: a run was stopped at --run-limit-s; {report['steps_compared']} of {args.steps} steps compared")
        return 3
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
