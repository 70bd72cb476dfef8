"""A/B timing of the softcap epilogue: fwd+bwd ms at the paper shape, bf16, without and with softcap=30.

Why: issue 12 replaced the kernels' tanh (the exp form alone) by one accurate for every cap (an odd polynomial
below |x| = 0.625, the exp form above), ~8 FMAs more per logit in the epilogue of every logit tile. This
measures what that costs, against an older tree, interleaved in fresh processes as tests/gpu/ab_compare.py does:

    mkdir -p .ab/old && git archive <commit before the change> cce_patch | tar -x -C .ab/old
    python3 tests/gpu/softcap_ab.py .ab/old .        # carry .ab to the device
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

N, D, V = 8192, 2304, 256000


def worker(root: str) -> dict[str, float]:
    sys.path.insert(0, root)
    import torch
    import triton

    from cce_patch import linear_cross_entropy

    torch.manual_seed(0)
    e = (torch.randn(N, D, device="cuda") / D**0.25).bfloat16().requires_grad_()
    c = (torch.randn(V, D, device="cuda") / D**0.25).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    out = {}
    for mode in ("memory", "speed"):
        for cap in (None, 30.0):
            def step(mode=mode, cap=cap):
                return torch.autograd.grad(linear_cross_entropy(e, c, t, impl="triton", mode=mode, softcap=cap), (e, c))

            out[f"{mode}/softcap={cap}"] = triton.testing.do_bench(step, rep=400, return_mode="median")
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(os.path.abspath(sys.argv[2]))), flush=True)
        return
    roots = sys.argv[1:] or [".ab/old", "."]
    results: dict[str, list] = {root: [] for root in roots}
    for rnd in range(2):
        for root in roots:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", root], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": ""})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            results[root].append(json.loads(line[7:]) if line else {"error": (proc.stdout + proc.stderr)[-400:]})
            print(f"round {rnd + 1} {root}: {results[root][-1]}", flush=True)


if __name__ == "__main__":
    main()
