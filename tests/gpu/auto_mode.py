"""mode="auto" against the two modes it chooses between, on one GPU, in one device call (~2.5 min on an H200).

    python3 tests/gpu/auto_mode.py --out DIR                   # every default section
    python3 tests/gpu/auto_mode.py --out DIR --sections ns,phi  # a subset
    python3 tests/gpu/auto_mode.py --tiny --device cpu --out DIR    # the plumbing on a CPU, in seconds

Sections (fwd+bwd of ``linear_cross_entropy`` in bf16, lm regime; memory, speed and auto interleaved in two
rounds, so the spread between a mode's two rounds is the noise; peak MB above the inputs; the mode auto took;
speed mode's working set as ``mode_choice.speed_working_set_bytes`` estimates it, next to its measured peak):

- ``ns``: the Gemma 2 head (D=2304, V=256000) at N = 256 ... 65536;
- ``ns-families`` (opt-in): the five family heads at N = 512, 2048, 32768, 65536;
- ``families``: the five family heads of ``cce-patch bench --preset families`` at N=8192;
- ``trainer``: the call the patched forward makes under the Trainer (shifted (16, L) targets, a masked prompt,
  ``reduction="sum"`` divided by the number of items) for Qwen2.5-0.5B's head (D=896, V=151936), L = 128..512:
  the regime where an Alpaca run measured speed mode slower (16 x <=512 tokens);
- ``pressure``: the paper shape with all but ~5 GB of the GPU taken: auto must take memory mode, and not fail;
- ``phi``: Phi 3.5's head (D=3072, V=32064) at N=8192, the weak family: memory mode's dS chunk budget
  (``fused/memory_mode.DS_CHUNK_BYTES``), speed mode's chunk budget, the forward's work items per SM
  (``fused/lse_kernel.FWD_WAVES``) and a 128x128 forward tile, each against the defaults;
- ``cold`` (opt-in): the first fwd+bwd call of each mode in a fresh process (Triton compilation included) at
  the trainer shape, since a 300-step run pays it once per kernel variant.

Writes ``auto_mode.json`` and ``auto_mode.png``; prints each row and, at the end, whether auto was within noise
of the better mode everywhere, and the smallest N*D*V from which speed mode won every measured point (what
``mode_choice.SPEED_MIN_WORK`` should be).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from cce_patch import linear_cross_entropy
from cce_patch.bench.__main__ import FAMILY_HEADS
from cce_patch.bench.memory import free_cached, peak_mb_above_inputs
from cce_patch.bench.regimes import make_inputs
from cce_patch.bench.report import environment
from cce_patch.bench.timing import median_ms
from cce_patch.ops import mode_choice
from cce_patch.ops.backends import get_backend, resolve_impl

MODES = ("memory", "speed", "auto")
GEMMA = FAMILY_HEADS["gemma2-2b"]
QWEN_05B = (896, 151936)
PHI = FAMILY_HEADS["phi3.5-mini"]


class Sweep:
    def __init__(self, device: torch.device, dtype: torch.dtype, rep_ms: float, tiny: bool):
        self.device, self.dtype, self.rep_ms, self.tiny = device, dtype, rep_ms, tiny
        self.rows: list[dict] = []

    def inputs(self, n: int, d: int, v: int, batch: int | None = None, masked: bool = False):
        e, c, t = make_inputs("lm", n, d, v, device=self.device, dtype=self.dtype)
        kwargs: dict = {}
        items = None
        if batch is not None:  # as the patched forward calls it under the Trainer
            e, t = e.view(batch, n // batch, d), t.view(batch, n // batch).clone()
            if masked:
                t[:, : t.shape[1] // 4] = -100  # the prompt
                t[batch // 2:, -t.shape[1] // 8:] = -100  # padding of half the rows
            kwargs = dict(shift=True, reduction="sum")
            items = int((t[:, 1:] != -100).sum())
        return e.requires_grad_(), c.requires_grad_(), t, kwargs, items

    def step(self, e, c, t, kwargs, items, mode, **extra):
        def run():
            loss = linear_cross_entropy(e, c, t, mode=mode, **kwargs, **extra)
            if items is not None:
                loss = loss / items
            return torch.autograd.grad(loss, (e, c))

        return run

    def chose(self, e, c, t, kwargs, **extra) -> str:
        loss = linear_cross_entropy(e, c, t, mode="auto", **kwargs, **extra)
        name = type(loss.grad_fn).__name__
        del loss
        return "speed" if name.startswith("SpeedModeFunction") else "memory"

    def measure(self, section: str, label: str, n: int, d: int, v: int, modes=MODES, batch=None, masked=False,
                **extra) -> dict:
        t0 = time.perf_counter()
        e, c, t, kwargs, items = self.inputs(n, d, v, batch, masked)
        row = {"section": section, "label": label, "n": n, "d": d, "v": v, "work": n * d * v, **extra}
        try:
            fns = {m: self.step(e, c, t, kwargs, items, m, **extra) for m in modes}
            times = {m: [] for m in modes}
            for _ in range(2):  # interleaved rounds: memory speed auto memory speed auto
                for m in modes:
                    times[m].append(median_ms(fns[m], self.device, warmup_ms=25, rep_ms=self.rep_ms, min_runs=5,
                                              cpu_repeats=2))
            for m in modes:
                row[f"{m}_ms"] = times[m]
                row[f"{m}_mb"] = peak_mb_above_inputs(fns[m], self.device)
            if "auto" in modes:
                row["auto_chose"] = self.chose(e, c, t, kwargs, **extra)
            backend = get_backend(resolve_impl("auto", e.device, e.dtype))
            budget = extra.get("speed_chunk_bytes") or 2 * 1024**3
            row["speed_est_mb"] = mode_choice.speed_working_set_bytes(n, d, v, e.dtype, backend, budget) / 1e6
            _verdict(row)
        except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        del e, c, t
        free_cached(self.device)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        print(_line(row), flush=True)
        return row


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1: len(xs) // 2 + 1]) / 2


def _verdict(row: dict) -> None:
    """auto within noise of the better mode: noise = the largest relative spread of a mode between rounds."""
    modes = [m for m in MODES if f"{m}_ms" in row]
    ms = {m: _median(row[f"{m}_ms"]) for m in modes}
    row["noise"] = max(abs(a - b) / ((a + b) / 2) for a, b in (row[f"{m}_ms"] for m in modes))
    if "auto" in ms and len(ms) > 1:  # against the better of the modes measured (pressure: memory only)
        best = min(v for m, v in ms.items() if m != "auto")
        row["auto_vs_best"] = ms["auto"] / best
        row["auto_ok"] = ms["auto"] <= best * (1 + max(row["noise"], 0.02))
    if {"memory", "speed"} <= set(ms):
        row["speed_wins"] = ms["speed"] <= ms["memory"]


def _line(row: dict) -> str:
    if "error" in row:
        return f"[{row['section']}] {row['label']}: ERROR {row['error']}"
    parts = [f"[{row['section']}] {row['label']} (N={row['n']}, D={row['d']}, V={row['v']}, NDV={row['work']:.2g}):"]
    for m in MODES:
        if f"{m}_ms" in row:
            mb = row[f"{m}_mb"]
            parts.append(f"{m} {'/'.join(f'{x:.2f}' for x in row[m + '_ms'])} ms {'' if mb is None else f'{mb:,.0f} MB'}")
    if "auto_chose" in row:
        parts.append(f"auto chose {row['auto_chose']}, auto/best {row['auto_vs_best']:.3f} "
                     f"(noise {row['noise']:.3f}) {'ok' if row['auto_ok'] else 'SLOWER'}")
    parts.append(f"speed est {row['speed_est_mb']:,.0f} MB")
    return " | ".join(parts)


def section_ns(s: Sweep) -> None:
    d, v = (64, 4000) if s.tiny else GEMMA
    for n in ([64, 256] if s.tiny else [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]):
        s.measure("ns", f"gemma2 head N={n}", n, d, v)


def section_ns_families(s: Sweep) -> None:
    """The five family heads at N below and above ``families``' 8192 (at N=512 Phi 3.5's head is under
    ``SPEED_MIN_WORK``: auto takes memory mode there)."""
    heads = {"tiny": (64, 4000)} if s.tiny else FAMILY_HEADS
    for name, (d, v) in heads.items():
        for n in ([64] if s.tiny else [512, 2048, 32768, 65536]):
            s.measure("ns-families", f"{name} N={n}", n, d, v)


def section_families(s: Sweep) -> None:
    heads = {"tiny": (64, 4000)} if s.tiny else FAMILY_HEADS
    for name, (d, v) in heads.items():
        s.measure("families", name, 256 if s.tiny else 8192, d, v)


def section_trainer(s: Sweep) -> None:
    d, v = (64, 4000) if s.tiny else QWEN_05B
    for seq in ([16, 32] if s.tiny else [128, 256, 384, 512]):
        s.measure("trainer", f"qwen2.5-0.5b head 16x{seq}", 16 * seq, d, v, batch=16, masked=True)


def section_pressure(s: Sweep) -> None:
    """All but ~5 GB taken: speed mode's ~3.4 GB working set is more than half of what is free."""
    if s.device.type != "cuda":
        print("[pressure] skipped: needs CUDA", flush=True)
        return
    n, (d, v) = 8192, GEMMA
    free_cached(s.device)
    keep = 5 * 10**9 + (n * d + v * d) * 2  # 5 GB above the inputs
    free, _ = torch.cuda.mem_get_info(s.device)
    blocker = torch.empty(max(0, free - keep), dtype=torch.uint8, device=s.device)
    mode_choice.clear_choices()
    try:
        row = s.measure("pressure", "paper shape, ~5 GB free", n, d, v, modes=("memory", "auto"))
        if row.get("auto_chose") != "memory":  # speed mode's ~3.4 GB is more than half of ~5 GB
            row["auto_ok"] = False
    finally:
        del blocker
        mode_choice.clear_choices()
        free_cached(s.device)


def section_phi(s: Sweep) -> None:
    """Candidates for small-vocabulary defaults, each against the defaults in the same call."""
    from cce_patch.ops.fused import lse_kernel as lk
    from cce_patch.ops.fused import memory_mode as fmm
    from cce_patch.ops.fused import tiles as tb

    n, (d, v) = (256, (64, 4000)) if s.tiny else (8192, PHI)
    s.measure("phi", "defaults", n, d, v, modes=("memory", "speed"))
    default_ds = fmm.DS_CHUNK_BYTES
    for mib in (32, 64, 256):
        fmm.DS_CHUNK_BYTES = mib * 2**20
        try:
            s.measure("phi", f"DS_CHUNK_BYTES={mib} MiB", n, d, v, modes=("memory",))
        finally:
            fmm.DS_CHUNK_BYTES = default_ds
    for mib in (256, 512):
        s.measure("phi", f"speed_chunk_bytes={mib} MiB", n, d, v, modes=("speed",), speed_chunk_bytes=mib * 2**20)
    default_waves = lk.FWD_WAVES
    for waves in (8, 16, 64):
        lk.FWD_WAVES = waves
        try:
            s.measure("phi", f"FWD_WAVES={waves}", n, d, v, modes=("memory", "speed"))
        finally:
            lk.FWD_WAVES = default_waves
    if s.device.type == "cuda":
        original = tb.tile_config
        alt = tb.TileConfig(128, 128, 64, 8, 4)
        tb.tile_config = lambda dtype, kernel="forward": alt if kernel in ("forward", "store") else original(dtype, kernel)
        try:
            s.measure("phi", "forward/store tiles 128x128x64 w8 s4", n, d, v, modes=("memory", "speed"))
        finally:
            tb.tile_config = original


COLD = """
import sys, time, torch
from cce_patch import linear_cross_entropy
from cce_patch.bench.regimes import make_inputs
mode, n, d, v, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
e, c, t = make_inputs("lm", n, d, v, device=dev, dtype=dtype)
e, c = e.view(16, n // 16, d).requires_grad_(), c.requires_grad_()
t = t.view(16, n // 16)
times = []
for _ in range(3):
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = linear_cross_entropy(e, c, t, mode=mode, shift=True, reduction="sum") / t.numel()
    torch.autograd.grad(loss, (e, c))
    if dev == "cuda": torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) * 1e3)
print("COLD", mode, *times)
"""


def section_cold(s: Sweep) -> None:
    d, v = (64, 4000) if s.tiny else QWEN_05B
    n = 16 * (32 if s.tiny else 512)
    for mode in ("memory", "speed"):
        out = subprocess.run([sys.executable, "-c", COLD, mode, str(n), str(d), str(v), s.device.type],
                             capture_output=True, text=True, timeout=300)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("COLD")), None)
        row = {"section": "cold", "label": f"{mode} first calls, 16x{n // 16}", "n": n, "d": d, "v": v}
        if line is None:
            row["error"] = (out.stderr or out.stdout)[-300:]
        else:
            row["first_calls_ms"] = [float(x) for x in line.split()[2:]]
        s.rows.append(row)
        print(f"[cold] {row['label']}: {row.get('first_calls_ms', row.get('error'))}", flush=True)


SECTIONS = {"ns": section_ns, "families": section_families, "trainer": section_trainer,
            "ns-families": section_ns_families, "pressure": section_pressure, "phi": section_phi, "cold": section_cold}
DEFAULT_SECTIONS = "ns,families,trainer,pressure,phi"


def summary(rows: list[dict]) -> dict:
    judged = [r for r in rows if "auto_ok" in r]
    compared = sorted((r for r in rows if "speed_wins" in r and r["section"] in ("ns", "families", "trainer")),
                      key=lambda r: r["work"])
    # The smallest work W such that speed mode won at every compared point with work >= W.
    threshold = None
    for i, r in enumerate(compared):
        if all(x["speed_wins"] for x in compared[i:]):
            threshold = r["work"]
            break
    return {
        "auto_within_noise_everywhere": bool(judged) and all(r["auto_ok"] for r in judged),
        "auto_slower_rows": [r["label"] for r in judged if not r["auto_ok"]],
        "worst_auto_vs_best": max((r["auto_vs_best"] for r in judged), default=None),
        "speed_wins_from_work": threshold,
        "speed_loses_at": [(r["label"], r["work"]) for r in compared if not r["speed_wins"]],
        "SPEED_MIN_WORK_now": mode_choice.SPEED_MIN_WORK,
    }


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    ns = [r for r in rows if r["section"] == "ns" and "error" not in r]
    for m, style in zip(MODES, ("o-", "s-", "x--"), strict=True):
        xs = [r["n"] for r in ns]
        ys = [_median(r[f"{m}_ms"]) * 1e3 / r["n"] for r in ns]
        if xs:
            a.plot(xs, ys, style, label=m)
    a.set_xscale("log", base=2)
    a.set_xlabel("N (tokens)")
    a.set_ylabel("fwd+bwd µs per token")
    a.set_title("Gemma 2 head (D=2304, V=256000)", fontsize=10)
    a.legend()
    judged = [r for r in rows if "auto_vs_best" in r]
    b.bar(range(len(judged)), [r["auto_vs_best"] for r in judged],
          color=["tab:green" if r["auto_ok"] else "tab:red" for r in judged])
    b.errorbar(range(len(judged)), [1.0] * len(judged), yerr=[max(r["noise"], 0.02) for r in judged], fmt="none",
               ecolor="gray", capsize=2)
    b.set_xticks(range(len(judged)), [f"{r['section']}: {r['label']}" for r in judged], rotation=75, fontsize=6)
    b.set_ylabel("auto / min(memory, speed)")
    b.set_title("auto against the better mode (gray: noise band)", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/gpu"))
    p.add_argument("--sections", default=DEFAULT_SECTIONS, help=f"comma-separated from {', '.join(SECTIONS)}")
    p.add_argument("--device", default=None)
    p.add_argument("--rep-ms", type=float, default=60.0)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the plumbing, on a CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sweep = Sweep(device, dtype, args.rep_ms, args.tiny)
    env = environment(device, ["python3", "tests/gpu/auto_mode.py", *(argv if argv is not None else sys.argv[1:])])
    print(env["device"], env["torch"], env["triton"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [x.strip() for x in args.sections.split(",") if x.strip()]:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        SECTIONS[name](sweep)
        print(f"--- section {name}: {time.perf_counter() - t0:.0f}s", flush=True)
        (args.out / "auto_mode.json").write_text(json.dumps(
            {"environment": env, "partial": True, "rows": sweep.rows}, indent=1) + "\n")
    result = summary(sweep.rows)
    (args.out / "auto_mode.json").write_text(json.dumps(
        {"environment": env, "summary": result, "rows": sweep.rows}, indent=1) + "\n")
    plot(sweep.rows, args.out / "auto_mode.png", f"{env['device']} — torch {env['torch']}, triton {env['triton']}")
    print("SUMMARY", json.dumps(result), flush=True)
    return 0 if result["auto_within_noise_everywhere"] and not any("error" in r for r in sweep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
