"""Filtered vs exact speed mode on the Triton backend: forward+backward time at the paper shape, per input kind.

    python tests/gpu/filter_speed.py [--n 8192 --d 2304 --v 256000 --eps 0.0009765625]

Kinds: ``confident`` (rows next to their target's unit classifier row: nearly every tile skipped, the
block-sparse kernels run), ``lm`` (bench/regimes.py's LM-like logits, vocabulary sorted by mean logit) and
``flat`` (nothing skippable: the dense GEMMs run, the filter's cost is the tile masses and the decision).
Prints one line per kind: exact ms, filtered ms, skipped fraction, largest dropped row mass.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from cce_patch import linear_cross_entropy
from cce_patch.bench.regimes import make_inputs as regime_inputs
from cce_patch.ops.filtering import FilterCounter


def inputs(kind: str, n: int, d: int, v: int):
    if kind == "confident":
        g = torch.Generator(device="cuda").manual_seed(0)
        c = torch.randn(v, d, device="cuda", generator=g)
        c /= c.norm(dim=1, keepdim=True)
        t = torch.randint(0, 2000, (n,), device="cuda", generator=g)
        e = 24.0 * c[t] + 0.1 * torch.randn(n, d, device="cuda", generator=g)
        return e.bfloat16(), c.bfloat16(), t
    e, c, t = regime_inputs(kind, n, d, v, device="cuda", dtype=torch.bfloat16)
    if kind == "lm":
        vocab = (c.float() @ e.float().mean(0)).argsort(descending=True)
        new_id = torch.empty_like(vocab)
        new_id[vocab] = torch.arange(v, device="cuda")
        c, t = c[vocab].contiguous(), new_id[t]
    return e, c, t


def step(e, c, t, eps, counter=None):
    e.grad = c.grad = None
    linear_cross_entropy(e, c, t, impl="triton", mode="speed", filter_eps=eps, filter_counter=counter).backward()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--v", type=int, default=256000)
    parser.add_argument("--eps", type=float, default=2.0**-10)
    parser.add_argument("--kinds", default="confident,lm,flat")
    args = parser.parse_args()
    for kind in args.kinds.split(","):
        measure(kind, args)
        torch.cuda.empty_cache()


def measure(kind: str, args: argparse.Namespace) -> None:
    e, c, t = inputs(kind, args.n, args.d, args.v)
    e, c = e.requires_grad_(), c.requires_grad_()
    counter = FilterCounter()
    step(e, c, t, args.eps, counter)
    stats = counter.stats()
    exact = do_bench(lambda: step(e, c, t, None), warmup=5, rep=40)
    filtered = do_bench(lambda: step(e, c, t, args.eps), warmup=5, rep=40)
    print(f"{kind:10s} N={args.n} D={args.d} V={args.v} eps={args.eps:g}: exact {exact:.2f} ms, filtered "
          f"{filtered:.2f} ms, skipped {stats.skipped_fraction:.3f}, max dropped {stats.max_row_dropped_mass:.2e}",
          flush=True)

if __name__ == "__main__":
    main()
