"""A/B timing of the op between source trees and tuning settings, interleaved, in one device call.

Why: run-to-run spread on one device kind is +-2-3 ms at the paper shape, about the size of the changes being
judged, so two versions are only comparable when timed in the same call, alternating (A B A B), each in a
fresh process (no kernel cache, allocator or autotuning state shared between versions).

    # an older tree beside the working one (.ab/ is git-ignored; carry it to the device)
    mkdir -p .ab/old && git archive HEAD~1 cce_patch | tar -x -C .ab/old
    python3 tests/gpu/ab_compare.py --variant new=. --variant old=.ab/old \\
        --variant big_ds=.:fused.memory_mode.DS_CHUNK_BYTES=268435456 --modes memory,speed --regimes flat,lm

A mode may carry options of the op in brackets, e.g. the filter beside the exact speed mode:
``--modes 'speed,speed[filter_eps=2^-12,filter_vocab_order=natural]'`` (the benchmark's method syntax:
``cce_patch.bench.methods.parse_spec``).

A variant is ``name=ROOT[:module.ATTR=value,...]``: ``ROOT`` holds the ``cce_patch`` package to import, and each
``module.ATTR=value`` sets a constant of ``cce_patch.ops.<module>`` (ints, floats, True/False) before anything
runs. Prints one table (median fwd+bwd ms, ``triton.testing.do_bench`` on CUDA, one column per variant and round)
and, with ``--json``, writes the numbers there.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PAPER = (8192, 2304, 256000)


def parse_variant(text: str) -> tuple[str, str, dict[str, object]]:
    name, _, rest = text.partition("=")
    root, _, settings = rest.partition(":")
    values: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        key, _, raw = item.partition("=")
        values[key] = ast.literal_eval(raw)
    if not name or not root:
        raise SystemExit(f"--variant wants name=ROOT[:module.ATTR=value,...], got {text!r}")
    return name, os.path.abspath(root), values


def worker(root: str, settings: dict[str, object], modes: list[tuple[str, str, dict]], regimes: list[str],
           rep_ms: int, shape: tuple[int, int, int], device: str) -> dict:
    """Runs in a fresh process: import cce_patch from ``root``, apply ``settings``, time every (mode, regime);
    ``modes`` as (label, mode, options), parsed by the parent (an older tree may parse options differently)."""
    sys.path.insert(0, root)
    import importlib

    import torch

    import cce_patch
    from cce_patch import linear_cross_entropy
    from cce_patch.bench.regimes import make_inputs
    from cce_patch.bench.timing import median_ms

    if not os.path.abspath(cce_patch.__file__).startswith(root):
        raise SystemExit(f"imported {cce_patch.__file__}, not the tree under {root}")
    for key, value in settings.items():
        module, attr = key.rsplit(".", 1)
        mod = importlib.import_module(f"cce_patch.ops.{module}")
        if not hasattr(mod, attr):
            raise SystemExit(f"cce_patch.ops.{module} has no {attr}")
        setattr(mod, attr, value)
    out: dict[str, float | str] = {}
    for regime in regimes:
        e, c, t = make_inputs(regime, *shape, device=device, dtype=torch.bfloat16)
        ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()
        for item, mode, options in modes:
            def step(mode=mode, options=options, ee=ee, cc=cc, t=t):
                loss = linear_cross_entropy(ee, cc, t, impl="triton", mode=mode, **options)
                return torch.autograd.grad(loss, (ee, cc))

            try:
                out[f"{item}/{regime}"] = median_ms(step, torch.device(device), rep_ms=rep_ms)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result too
                out[f"{item}/{regime}"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            del step
        e = c = t = ee = cc = None
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="name=ROOT[:module.ATTR=value,...]")
    ap.add_argument("--modes", default="memory,speed")
    ap.add_argument("--regimes", default="flat,lm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep-ms", type=int, default=400)
    ap.add_argument("--shape", default=",".join(map(str, PAPER)), help="N,D,V (default: the paper's)")
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of the plumbing")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-modes", default=None, help=argparse.SUPPRESS)  # JSON: [[label, mode, options], ...]
    args = ap.parse_args()
    regimes = args.regimes.split(",")
    if args.worker:
        name, root, settings = parse_variant(args.worker)
        shape = tuple(int(x) for x in args.shape.split(","))
        modes = [tuple(m) for m in json.loads(args.worker_modes)]
        print("RESULT " + json.dumps(worker(root, settings, modes, regimes, args.rep_ms, shape, args.device)),
              flush=True)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this tree's parser, the bench's method syntax
    from cce_patch.bench.methods import parse_spec, split_specs

    modes = [(item, *parse_spec(item)) for item in split_specs(args.modes)]
    variants = [parse_variant(v) for v in args.variant]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for rnd in range(args.rounds):
        for spec, (name, _, _) in zip(args.variant, variants, strict=True):
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", spec, "--worker", spec,
                   "--worker-modes", json.dumps(modes), "--regimes", args.regimes, "--rep-ms", str(args.rep_ms),
                   "--shape", args.shape, "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stdout + proc.stderr)[-600:]
                results[name].append({"error": f"rc={proc.returncode}: {tail}"})
            else:
                results[name].append(json.loads(line[7:]))
            print(f"round {rnd + 1} {name}: {results[name][-1]}", flush=True)
    keys = [f"{item}/{r}" for item, _, _ in modes for r in regimes]
    cols = [(name, k) for name, _, _ in variants for k in range(args.rounds)]
    print("\n| fwd+bwd ms | " + " | ".join(f"{n} #{k + 1}" for n, k in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for key in keys:
        cells = []
        for name, k in cols:
            val = results[name][k].get(key, results[name][k].get("error", "?"))
            cells.append(f"{val:.2f}" if isinstance(val, float) else (str(val).strip().splitlines() or ["?"])[-1][:60])
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants": args.variant, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
