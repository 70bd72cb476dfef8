"""Profile and tune the two Triton kernels at the paper shape (bf16, lm regime) in one device call.

Run on the device: ``python3 tests/gpu/tune_tiles.py [--quick]``. Prints, for KERNEL_NOTES.md:
  1. cuBLAS floors: S = e @ c.T, dC = dS^T e, dE = dS c (bf16, the same sizes as ours);
  2. forward (loss only) per candidate tile shape x row-group size x forward waves;
  3. the backward's logit-gradient kernel alone (all vocabulary chunks, no GEMM) per tile shape x group;
  4. the full backward (kernel + cuBLAS GEMMs) and forward+backward through ``linear_cross_entropy``.
The winners become ``tile_config`` / ``FWD_WAVES`` defaults.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.testing

from cce_patch import linear_cross_entropy
from cce_patch.bench.regimes import make_inputs
from cce_patch.ops.fused import lse_kernel as lk
from cce_patch.ops.fused import memory_mode as mm
from cce_patch.ops.fused import tiles as tb
from cce_patch.ops.spec import LossSpec

TILES = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),  # half the accumulator: two programs per SM, one's epilogue under the other's matmul
    (128, 128, 64, 4, 4),
]
GROUPS = [8, 32]
WAVES = [32, 64]
TMA = [True, False]
FWD_LOADS = [(True, False), (True, True), (False, False), (False, True)]  # (tma, flat loop)


def bench(fn, rep=300) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def use(tiles, group):
    cfg = tb.TileConfig(*tiles, group_m=group)
    tb.tile_config = lambda dtype, kernel="forward", cfg=cfg: cfg  # noqa: E731


def cublas_floors(e, c) -> None:
    n, d, v = e.shape[0], e.shape[1], c.shape[0]
    ds = torch.randn(n, 8192, device="cuda", dtype=torch.bfloat16) * 1e-4
    acc = torch.zeros(n, d, device="cuda")
    dc = torch.empty_like(c)
    s_ms = bench(lambda: e @ c.T)
    dc_ms = bench(lambda: torch.mm(ds.T, e, out=dc[:8192])) * v / 8192
    de_ms = bench(lambda: torch.addmm(acc, ds, c[:8192], out_dtype=torch.float32, out=acc)) * v / 8192
    print(f"cuBLAS: S {s_ms:.2f} ms, dC {dc_ms:.2f} ms (chunks of 8192), dE += (fp32 out) {de_ms:.2f} ms (chunked)")


def main(quick: bool) -> None:
    n, d, v = 8192, 2304, 256000
    e, c, t = make_inputs("lm", n, d, v, device="cuda", dtype=torch.bfloat16)
    default = tb.tile_config(torch.bfloat16)
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), "default", default, lk.FWD_WAVES)
    cublas_floors(e, c)
    spec = LossSpec()
    fwd = {}
    print(f"tma flat {'forward tiles':>22} group waves | ms")
    for tma, flat in FWD_LOADS:
        tb.USE_TMA, lk.FWD_FLAT_LOOP = tma, flat
        for tiles in TILES[:1] if quick else TILES:
            for group in GROUPS[-1:]:
                for waves in WAVES:
                    use(tiles, group)
                    lk.FWD_WAVES = waves
                    key = f"{tma:d}   {flat:d}  {str(tiles):>22} {group:5d} {waves:5d}"
                    try:
                        fwd[tma, flat, tiles, group, waves] = ms = bench(lambda: mm.forward(e, c, None, t, spec))
                        print(f"{key} | {ms:6.2f}", flush=True)
                    except Exception as exc:  # noqa: BLE001 - a shape may exceed shared memory; report, go on
                        print(f"{key} | failed {type(exc).__name__}: {str(exc)[:80]}")
    best_f = min(fwd, key=fwd.get)
    print("best forward", best_f, f"{fwd[best_f]:.2f} ms", flush=True)
    lk.FWD_WAVES = best_f[4]
    tb.USE_TMA, lk.FWD_FLAT_LOOP = best_f[:2]
    loss, lse = mm.forward(e, c, None, t, spec)
    g = torch.full_like(loss, 1.0 / n)
    bwd = {}
    print(f"tma {'logit-grad tiles':>22} group | ms (all chunks, kernel only)")
    for tma in TMA:
        tb.USE_TMA = tma
        for tiles in TILES:
            for group in GROUPS:
                use(tiles, group)
                key = f"{tma:d} {str(tiles):>22} {group:5d}"
                try:
                    bwd[tma, tiles, group] = ms = bench(
                        lambda: mm.backward(e, c, None, t, spec, lse, g, None, (False, False, False)))
                    print(f"{key} | {ms:6.2f}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"{key} | failed {type(exc).__name__}: {str(exc)[:80]}")
    best_b = min(bwd, key=bwd.get)
    print("best logit-grad", best_b, f"{bwd[best_b]:.2f} ms", flush=True)
    old = tuple(getattr(default, f) for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
    for label, (f_tma, f_tiles, f_group), (b_tma, b_tiles, b_group) in (
        ("default", (True, old, default.group_m), (True, old, default.group_m)),
        ("best", (best_f[0], best_f[2], best_f[3]), best_b),
    ):
        fc = tb.TileConfig(*f_tiles, group_m=f_group)
        bc = tb.TileConfig(*b_tiles, group_m=b_group)
        tb.tile_config = lambda dtype, kernel="forward", fc=fc, bc=bc: fc if kernel == "forward" else bc  # noqa: E731
        if f_tma != b_tma:
            print(f"{label}: forward tma={f_tma} and backward tma={b_tma} differ; timing with tma={b_tma}")
        tb.USE_TMA = b_tma
        full_b = bench(lambda: mm.backward(e, c, None, t, spec, lse, g, None, (True, True, False)))
        with torch.no_grad():
            f_ms = bench(lambda: linear_cross_entropy(e, c, t))
        ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()

        def step(ee=ee, cc=cc):
            ee.grad = cc.grad = None
            linear_cross_entropy(ee, cc, t).backward()

        fb = bench(step, rep=1000)
        print(f"{label}: tma {f_tma}/{b_tma} waves {lk.FWD_WAVES} fwd {fc} bwd {bc}:", flush=True)
        print(f"    op fwd {f_ms:.2f} ms, backend bwd {full_b:.2f} ms, op fwd+bwd {fb:.2f} ms", flush=True)


if __name__ == "__main__":
    main("--quick" in sys.argv)
