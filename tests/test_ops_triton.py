"""The Triton kernels (under TRITON_INTERPRET=1 on CPU, natively on GPU) against the fp64 oracle.

Shapes are deliberately not multiples of the block sizes; V stays small because the interpreter executes
every program in numpy.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from oracle import TOL, check_against_oracle, make_inputs

from cce_patch import linear_cross_entropy

pytestmark = pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"
triton_op = partial(linear_cross_entropy, impl="triton")


def _check(shape, d, v, dtype=torch.float32, regime="flat", bias=False, ignore_frac=0.2, **kw):
    e, c, t, b = make_inputs(shape, d, v, dtype, regime=regime, bias=bias, ignore_frac=ignore_frac, device=DEVICE)
    return check_against_oracle(triton_op, e, c, t, b, TOL[dtype], **kw)


@pytest.mark.parametrize("reduction,shift,softcap", list(itertools.product(["mean", "sum", "none"], [False, True], [None, 4.0])))
def test_matrix(reduction, shift, softcap):
    _check((3, 13), 40, 300, reduction=reduction, shift=shift, softcap=softcap)


def test_odd_shape_bias_smoothing_lse():
    _check((37,), 67, 1003, bias=True, label_smoothing=0.1, return_lse=True, softcap=30.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("regime", ["flat", "peaked"])
def test_dtypes_and_regimes(dtype, regime):
    _check((2, 19), 48, 257, dtype=dtype, regime=regime, shift=True)


def test_all_ignored():
    e, c, t, _ = make_inputs((2, 7), 16, 100, torch.float32, ignore_frac=1.0, device=DEVICE)
    loss = triton_op(e, c, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(e.grad) == 0 and torch.count_nonzero(c.grad) == 0


def test_some_blocks_fully_ignored():
    """Row blocks whose targets are all ignored skip the matmul; their neighbours must be unaffected."""
    e, c, t, _ = make_inputs((70,), 24, 130, torch.float32, ignore_frac=0.0, device=DEVICE)
    t[:40] = -100
    check_against_oracle(triton_op, e, c, t, None, TOL[torch.float32])


def test_grads_only_where_required():
    e, c, t, _ = make_inputs((11,), 16, 90, torch.float32, device=DEVICE)
    c.requires_grad_(False)
    triton_op(e, c, t).backward()
    assert e.grad is not None and c.grad is None
    e2, c2, t2, _ = make_inputs((11,), 16, 90, torch.float32, device=DEVICE)
    e2.requires_grad_(False)
    _check_only_c = triton_op(e2, c2, t2)
    _check_only_c.backward()
    assert c2.grad is not None and e2.grad is None


@pytest.mark.parametrize("tma,flat", [(True, True), (True, False), (False, False)],
                         ids=["tma-flat", "tma-nested", "pointers"])
def test_matches_torch_path(tma, flat, monkeypatch):
    """Both ways of loading the matmul tiles (copy-engine descriptors, pointer loads) and both forward loop
    structures (the flat one runs only with descriptors) against the torch path."""
    from cce_patch.ops.fused import lse_kernel, tiles

    monkeypatch.setattr(tiles, "USE_TMA", tma)
    monkeypatch.setattr(lse_kernel, "FWD_FLAT_LOOP", flat)
    monkeypatch.setattr(lse_kernel, "FWD_WAVES", 1)  # one split: each program walks every vocab tile
    e, c, t, b = make_inputs((4, 9), 32, 211, torch.float32, bias=True, device=DEVICE)
    assert tiles.matmul_operands(e.reshape(-1, 32), c, tiles.tile_config(e.dtype))[2] == tma
    outs = []
    for impl in ("triton", "torch"):
        for x in (e, c, b):
            x.grad = None
        loss = linear_cross_entropy(e, c, t, bias=b, shift=True, softcap=5.0, impl=impl)
        loss.backward()
        outs.append([loss.detach(), e.grad.clone(), c.grad.clone(), b.grad.clone()])
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_several_vocab_chunks_in_backward(monkeypatch):
    """A dS budget of a few columns forces several vocabulary chunks, the last one ragged: every slice of dC
    and dbias must be written once and dE must accumulate over all chunks."""
    from cce_patch.ops.fused import memory_mode

    monkeypatch.setattr(memory_mode, "DS_CHUNK_BYTES", 29 * 64 * 4)  # 29 rows x 64 cols fp32 -> 64-col chunks
    e, c, t, b = make_inputs((29,), 40, 300, torch.float32, bias=True, device=DEVICE)
    check_against_oracle(triton_op, e, c, t, b, TOL[torch.float32], label_smoothing=0.2, softcap=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_groups_in_backward(dtype, monkeypatch):
    """Past the square chunk side the backward splits rows into groups (3 here, the last ragged) inside each
    of 3 vocabulary chunks: sequences straddle group boundaries under the shift, dC sums over the groups in
    fp32 before its one rounding, dE and dbias over the chunks; one group is fully ignored."""
    from cce_patch.ops.fused import memory_mode, tiles

    small = tiles.TileConfig(32, 64, 32, 4, 2, group_m=2)  # the interpreter's tiles, on a GPU too
    original = tiles.tile_config
    monkeypatch.setattr(tiles, "tile_config",
                        lambda dt, kernel="forward": small if kernel == "backward" else original(dt, kernel))
    budget = 32 * 64 * torch.empty((), dtype=dtype).element_size()  # 32 x 64 elements: 32-row groups
    monkeypatch.setattr(memory_mode, "DS_CHUNK_BYTES", budget)
    e, c, t, b = make_inputs((10, 7), 24, 150, dtype, bias=True, device=DEVICE)
    t[:5] = -100  # with the shift, rows 0..31 (group 1) are all ignored
    t[5, :5] = -100
    cfg = tiles.tile_config(dtype, "backward")
    assert memory_mode.ds_chunk_shape(70, 150, e.element_size(), budget, cfg) == (32, 64)
    check_against_oracle(triton_op, e, c, t, b, TOL[dtype], shift=True, softcap=5.0, label_smoothing=0.1,
                         return_lse=True)


@pytest.mark.parametrize("n,v,expect", [
    (8192, 256000, (8192, 8192)),     # the paper shape: all rows in one group, as before row groups existed
    (4096, 256000, (4096, 16384)),    # fewer rows: wider chunks
    (16384, 256000, (16384, 4096)),   # up to twice the square side one group moves no more bytes
    (65536, 256000, (8192, 8192)),    # 8 groups of 8,192 rows: chunk width no longer shrinks with N
    (20000, 256000, (6784, 9728)),    # 3 balanced groups (6784 = 53 row blocks), the last one ragged
    (8192, 1000, (8192, 1024)),       # never wider than the (tile-rounded) vocabulary
    (100, 50, (100, 256)),            # at least one tile of columns
])
def test_ds_chunk_shape(n, v, expect):
    from cce_patch.ops.fused.memory_mode import DS_CHUNK_BYTES, ds_chunk_shape
    from cce_patch.ops.fused.tiles import TileConfig

    cfg = TileConfig(128, 256, 64, 8, 4)
    rows, cols = ds_chunk_shape(n, v, 2, DS_CHUNK_BYTES, cfg)
    assert (rows, cols) == expect
    assert rows * cols * 2 <= DS_CHUNK_BYTES or cols == cfg.block_n


def test_fp16_smoothing_bias_lse_shift():
    _check((2, 23), 56, 333, dtype=torch.float16, bias=True, shift=True, label_smoothing=0.1, return_lse=True,
           softcap=20.0, reduction="none")


def test_backend_computes_only_needed_grads():
    """The backend returns None for (and never allocates) gradients nobody asked for."""
    from cce_patch.ops.fused import memory_mode
    from cce_patch.ops.spec import LossSpec

    e, c, t, b = make_inputs((13,), 24, 150, torch.float32, bias=True, device=DEVICE)
    spec = LossSpec()
    loss, lse = memory_mode.forward(e.detach(), c.detach(), b.detach(), t, spec)
    g = torch.ones_like(loss)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]:
        grads = memory_mode.backward(e.detach(), c.detach(), b.detach(), t, spec, lse, g, None, needs)
        assert [x is not None for x in grads] == list(needs)
        for x, ref in zip(grads, (e, c, b), strict=True):
            assert x is None or (x.shape == ref.shape and x.dtype == ref.dtype and torch.isfinite(x).all())


def test_frozen_bias_gets_no_grad():
    e, c, t, b = make_inputs((17,), 24, 150, torch.float32, bias=True, device=DEVICE)
    b.requires_grad_(False)
    triton_op(e, c, t, bias=b).backward()
    assert b.grad is None and e.grad is not None and c.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_with_lse(reduction):
    e, c, t, _ = make_inputs((2, 5), 16, 100, torch.float32, ignore_frac=1.0, device=DEVICE)
    loss, lse = triton_op(e, c, t, reduction=reduction, return_lse=True, shift=True)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(lse) == 0
    (loss.sum() + (lse**2).sum()).backward()
    assert torch.count_nonzero(e.grad) == 0 and torch.count_nonzero(c.grad) == 0


@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_ignored_rows_with_huge_logits_stay_finite(mode):
    e, c, t, _ = make_inputs((9,), 16, 50, torch.float32, ignore_frac=0.0, device=DEVICE)
    with torch.no_grad():
        e[4] *= 400.0 / e[4].norm()
        c[:5] = e[4] / e[4].norm()  # row 4's logits reach ~400, beyond exp's fp32 range
    t[4] = -100
    check_against_oracle(partial(triton_op, mode=mode), e, c, t, None, TOL[torch.float32])


def test_fp32_products_follow_torchs_tf32_switch(tf32):
    """IEEE fp32 products unless the user opted into TF32 through torch (which also governs cuBLAS); half
    types never take the fp32 flag. On a GPU the TF32 tiles differ from the IEEE ones (interpreter: one tile)."""
    from cce_patch.ops.fused import tiles as tb
    from cce_patch.ops.spec import LossSpec

    e = torch.zeros(4, 64)
    cfg = tb.tile_config(torch.float32)
    tf32.set(False)
    assert tb.kernel_flags(e, None, LossSpec(), cfg)["IEEE_FP32"] is True
    ieee_tiles = tb.tile_config(torch.float32)
    tf32.set(True)
    assert tb.kernel_flags(e, None, LossSpec(), cfg)["IEEE_FP32"] is False
    assert tb.kernel_flags(e.bfloat16(), None, LossSpec(), cfg)["IEEE_FP32"] is False
    if not INTERPRETING:
        assert tb.tile_config(torch.float32) != ieee_tiles
        assert tb.tile_config(torch.float32, "store") == ieee_tiles
