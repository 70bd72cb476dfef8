"""Time the two Triton kernels under candidate tile shapes at the paper shape (bf16, lm regime).

Run on the device: ``python3 tests/gpu/tune_tiles.py``. Prints one row per candidate: forward ms (loss only)
and forward+backward ms through ``linear_cross_entropy``; the winner becomes ``tile_config``'s default.
"""

from __future__ import annotations

import torch
import triton.testing

from cce_patch import linear_cross_entropy
from cce_patch.bench.regimes import make_inputs
from cce_patch.ops import triton_backend as tb

CANDIDATES = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 256, 32, 8, 4),
    (256, 256, 64, 8, 2),
    (128, 128, 128, 8, 3),
]


def main() -> None:
    e, c, t = make_inputs("lm", 8192, 2304, 256000, device="cuda", dtype=torch.bfloat16)
    print(f"{'tiles':>24} | fwd ms | fwd+bwd ms")
    for cand in CANDIDATES:
        cfg = tb.TileConfig(*cand)
        tb.tile_config = lambda dtype, kernel="forward", cfg=cfg: cfg  # noqa: E731
        try:
            with torch.no_grad():
                fwd = triton.testing.do_bench(lambda: linear_cross_entropy(e, c, t), warmup=50, rep=300)
            ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()

            def step(ee=ee, cc=cc):
                ee.grad = cc.grad = None
                linear_cross_entropy(ee, cc, t).backward()

            both = triton.testing.do_bench(step, warmup=50, rep=500)
            print(f"{str(cand):>24} | {fwd:6.2f} | {both:6.2f}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a config may exceed shared memory; report and go on
            print(f"{str(cand):>24} | failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)


if __name__ == "__main__":
    main()
