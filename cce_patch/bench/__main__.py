"""``python -m cce_patch.bench`` / ``cce-patch bench``: kernel benchmark, ours and peers side by side.

Examples::

    cce-patch bench --preset paper                       # N=8192 D=2304 V=256000, flat/peaked/lm, all methods
    cce-patch bench --preset families --out outputs/fam  # the five families' head shapes at N=8192
    cce-patch bench --preset heads --rep-ms 25 --warmup-ms 10   # 7 heads x N 2k/8k/32k vs torch.compile, TRL, GEMM
    cce-patch bench --heads gemma3-4b,qwen3-8b --n 8192 --methods 'ours,torch.compile,gemm'
    cce-patch bench --heads 2304x256000,phi3.5-mini      # a head by its D x V, beside a named one
    cce-patch bench --preset scaling --methods ours,torch.compile
    cce-patch bench --shape 4096x2048x128256 --regimes lm --methods 'ours,ours[mode=speed],torch'
    cce-patch bench --preset scaling --methods 'ours[mode=memory],ours[mode=speed],ours'   # ours = mode="auto"
    cce-patch bench --regimes lm --dtype fp32 --tf32     # fp32 inputs, TF32 tensor cores opted in
    cce-patch bench --preset tiny --device cpu           # seconds on a CPU (CI smoke test)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import methods as M
from .regimes import REGIMES
from .report import environment, markdown_table, write_all, write_partial
from .runner import BenchConfig, records_to_dicts, run

#: The five families' lm-head shapes (D, V) from ANCHORS.md: Gemma 2 2B, Qwen 2.5 7B, Phi 3.5 mini,
#: Mistral NeMo 12B, Llama 3.1 8B.
FAMILY_HEADS = {
    "gemma2-2b": (2304, 256000),
    "qwen2.5-7b": (3584, 152064),
    "phi3.5-mini": (3072, 32064),
    "mistral-nemo-12b": (5120, 131072),
    "llama3.1-8b": (4096, 128256),
}

#: The heads of ``--heads`` / the heads preset: the five families plus Gemma 3's (4B and up: D=2560,
#: V=262144, the largest vocabulary of the families) and Qwen 3's (8B: D=4096, V=151936).
HEADS = {**FAMILY_HEADS, "gemma3-4b": (2560, 262144), "qwen3-8b": (4096, 151936)}
#: A heads run's token counts (``--n`` overrides): short, typical and long sequences per step; 32k is where a
#: fused loss should hold well under torch.compile's logits.
HEADS_NS = (2048, 8192, 32768)
#: A heads run's methods (issue 21's comparison): the default and both modes, the compiled plain loss (the
#: baseline of the ratios), TRL's fused head (skipped when TRL is absent) and one GEMM, the floor's unit.
HEADS_METHODS = ("ours", "ours[mode=speed]", "ours[mode=memory]", "torch.compile", "trl", "gemm")
#: A heads run on CPU: torch.compile there needs a C++ build per shape, so plain torch is the baseline.
HEADS_METHODS_CPU = ("ours", "ours[mode=speed]", "ours[mode=memory]", "torch", "trl", "gemm")

PRESETS: dict[str, dict] = {
    "paper": {"shapes": [(8192, 2304, 256000)], "regimes": list(REGIMES)},
    "families": {"shapes": [(8192, d, v) for d, v in FAMILY_HEADS.values()], "regimes": ["lm"]},
    "heads": {"shapes": [(n, d, v) for n in HEADS_NS for d, v in HEADS.values()], "regimes": ["lm"],
              "heads": list(HEADS)},
    "scaling": {"shapes": [(1024 * k, 2304, 256000) for k in (1, 2, 4, 8, 16, 32, 64)], "regimes": ["lm"]},
    "tiny": {"shapes": [(64, 32, 500)], "regimes": list(REGIMES)},
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"8192x2304x256000"`` or ``"8192,2304,256000"`` -> ``(N, D, V)``."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        n, d, v = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: expected NxDxV, e.g. 8192x2304x256000"
        ) from None
    if min(n, d, v) <= 0:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: sizes must be positive")
    return n, d, v


def parse_heads(text: str) -> dict[str, tuple[int, int]]:
    """``"gemma3-4b,64x500"`` -> ``{"gemma3-4b": (2560, 262144), "64x500": (64, 500)}``; ``"all"``: every
    head of ``HEADS``. A ``DxV`` entry names a head that is not in the list (and keeps CPU tests small)."""
    heads: dict[str, tuple[int, int]] = {}
    for name in (h.strip() for h in text.split(",")):
        if not name:
            continue
        if name == "all":
            heads.update(HEADS)
        elif name in HEADS:
            heads[name] = HEADS[name]
        else:
            parts = name.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise SystemExit(f"error: unknown head {name!r}; choose from all, {', '.join(HEADS)}, or DxV")
            heads[name] = (int(parts[0]), int(parts[1]))
    if not heads:
        raise SystemExit("error: --heads names no head")
    return heads


def build_parser(prog: str = "python -m cce_patch.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="shapes + regimes: paper (3 regimes), families (5 heads, lm), heads (the 7 heads of --heads all at "
        "N 2k/8k/32k, lm, with the heads methods), scaling (N 1k..64k, lm), tiny (CPU smoke test). "
        "Default: paper on CUDA, tiny on CPU",
    )
    p.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        default=None,
        metavar="NxDxV",
        help="shape(s) to run instead of the preset's (repeatable)",
    )
    p.add_argument(
        "--families",
        default=None,
        help=f"comma-separated subset of the family heads ({','.join(FAMILY_HEADS)}), at N=8192 (or --n); "
        "lets the families preset be split over several short runs",
    )
    p.add_argument(
        "--heads",
        default=None,
        help=f"comma-separated model heads ({','.join(HEADS)}, or all, or DxV), each at every N of --n "
        f"(default {','.join(map(str, HEADS_NS))}), regime lm; the table gets one block per head: fwd+bwd ms / "
        "MB per method, ratios to --baseline and to the 3-GEMM floor",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="the method the heads table divides by (default: torch.compile on CUDA, torch on CPU)",
    )
    p.add_argument(
        "--fwd",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the forward alone (default: on, off in a heads run, whose table is fwd+bwd only; "
        "forward-only methods such as gemm are timed either way)",
    )
    p.add_argument("--n", default=None, help="comma-separated N values, replacing N in every shape")
    p.add_argument("--regimes", default=None, help=f"comma-separated subset of {','.join(REGIMES)}")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated method specs; known: {','.join(M.KNOWN)}; ours takes options, e.g. "
        "'ours[mode=speed]' (passed to linear_cross_entropy; plain ours is the op's default, mode='auto'). "
        "Default: all (CUDA) / torch,ours",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="opt fp32 matmuls into TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 = True) for every "
        "method: torch's GEMMs, cuBLAS inside ours, and our Triton kernels, which follow the same switch",
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-errors", action="store_true", help="skip the fp32 ground truth and the gradient errors")
    p.add_argument("--warmup-ms", type=float, default=100.0)
    p.add_argument("--rep-ms", type=float, default=500.0, help="do_bench budget (at least 7 runs are timed)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for <name>.md/.json/.png")
    p.add_argument("--name", default=None, help="file stem of the outputs (default: the preset, or 'bench')")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    preset = PRESETS[args.preset or ("paper" if device.type == "cuda" else "tiny")]
    shapes = list(args.shape or preset["shapes"])
    heads = {name: HEADS[name] for name in preset.get("heads", ())}
    if args.heads:
        heads = parse_heads(args.heads)
    if heads and not args.shape:
        ns = [int(x) for x in args.n.split(",") if x.strip()] if args.n else list(HEADS_NS)
        # N-major: every head's short rows come first, so a run cut short (time limit, crash) at the longest N
        # has already written every shorter row; the largest cells, where methods run out of memory, come last.
        shapes = list(dict.fromkeys((n, d, v) for n in ns for d, v in heads.values()))
    if args.families and heads:
        raise SystemExit("error: --families and --heads (or --preset heads) are alternatives: choose one")
    if args.families:
        names = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in names if f not in FAMILY_HEADS]
        if unknown:
            raise SystemExit(f"error: unknown families {unknown}; choose from {', '.join(FAMILY_HEADS)}")
        shapes = [(8192, *FAMILY_HEADS[f]) for f in names]
        if not args.regimes and not args.preset:
            preset = PRESETS["families"]
    if args.n and not heads:
        ns = [int(x) for x in args.n.split(",") if x.strip()]
        shapes = list(
            dict.fromkeys((n, d, v) for d, v in dict.fromkeys((d, v) for _, d, v in shapes) for n in ns)
        )
    regimes = [r.strip() for r in args.regimes.split(",")] if args.regimes else list(preset["regimes"])
    for r in regimes:
        if r not in REGIMES:
            raise SystemExit(f"error: unknown regime {r!r}; choose from {', '.join(REGIMES)}")
    if heads and not args.regimes:
        regimes = ["lm"]
    if args.methods:
        specs = M.split_specs(args.methods)
    elif heads:
        specs = list(HEADS_METHODS if device.type == "cuda" else HEADS_METHODS_CPU)
    else:
        specs = M.default_specs(device)
    for s in specs:  # fail fast on typos, before any GPU work
        name, _ = M.parse_spec(s)
        if name not in M.KNOWN:
            raise SystemExit(f"error: unknown method {name!r}; known: {', '.join(M.KNOWN)}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    return BenchConfig(
        shapes=shapes,
        regimes=regimes,
        methods=specs,
        device=device,
        dtype=dtype,
        seed=args.seed,
        errors=not args.no_errors,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        heads={dv: name for name, dv in heads.items()},
        fwd=args.fwd if args.fwd is not None else not heads,
    )


def baseline_of(args: argparse.Namespace, device: torch.device) -> str:
    """The heads table's denominator: what a user compares a fused loss with (torch.compile of the plain loss);
    plain torch on CPU, where compiling means a C++ build per shape."""
    return args.baseline or ("torch.compile" if device.type == "cuda" else "torch")


def main(argv: Sequence[str] | None = None, prog: str = "python -m cce_patch.bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    cfg = config_from_args(args)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(cfg.device, [*prog.split(), *argv])
    logging.getLogger("cce_patch.bench").info(
        "device %s | shapes %s | regimes %s | methods %s | %s",
        env["device"],
        cfg.shapes,
        cfg.regimes,
        cfg.methods,
        str(cfg.dtype).removeprefix("torch."),
    )
    name = (
        args.name
        or args.preset
        or ("heads" if args.heads else None)
        or ("bench" if args.shape else ("paper" if cfg.device.type == "cuda" else "tiny"))
    )
    config = {
        "shapes": cfg.shapes,
        "regimes": cfg.regimes,
        "methods": cfg.methods,
        "dtype": str(cfg.dtype),
        "seed": cfg.seed,
        "errors": cfg.errors,
        "warmup_ms": cfg.warmup_ms,
        "rep_ms": cfg.rep_ms,
        "timing": "triton.testing.do_bench median (CUDA events)"
        if cfg.device.type == "cuda"
        else "time.perf_counter median",
        "preset": args.preset,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "fwd": cfg.fwd,
    }
    if cfg.heads:
        config["heads"] = {name: [d, v] for (d, v), name in cfg.heads.items()}
        config["baseline"] = baseline_of(args, cfg.device)
    args.out.mkdir(parents=True, exist_ok=True)
    done: list = []

    def checkpoint(rec) -> None:
        # Rewrite the JSON and the table after every record (each replaced whole, never half-written): a run
        # cut short (time limit, kill, crash) still leaves its numbers; `cce-patch report` plots them.
        done.append(rec)
        write_partial(args.out, name, env, config, records_to_dicts(done))

    results = records_to_dicts(run(cfg, on_record=checkpoint))
    paths = write_all(args.out, name, env, config, results, png=not args.no_png)
    print(markdown_table(results, env, config))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
