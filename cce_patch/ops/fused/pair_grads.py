"""Kernels of filtered memory mode: the logit gradient and its two products on the kept (row block, tile) pairs.

Memory mode stores no logits, so a filtered backward (``memory_filter.py``) recomputes only the pairs the filter
keeps. The rows are gathered into the filter's row order first (a copy of e, N x D), so a pair's BM rows are
consecutive and its tile loads are plain rectangles (the copy engine's, on Hopper). The pairs of a batch are
numbered tile by tile ("tile-major": all kept blocks of tile k, then of tile k + 1), and each pair's dS tile
(BM x BV, the input dtype) goes to its own slot of a compact buffer:

- ``pair_logit_grad_kernel``, one program per pair: recompute z for the pair's rows and tile, form dS as the
  exact memory mode does (``grad_kernel.logit_grad``) but without label smoothing's uniform term -g a / V,
  which the caller adds as the rank-one term it is (``filtering.py``), and store the tile to the pair's slot;
- ``pair_dc_kernel``, grid (tile, D tile): dC[tile] = sum over its kept blocks of dS^T @ e[block] (minus the
  smoothing row), written once and rounded once: a batch holds every kept block of its tiles, so no tile's sum
  is split over batches and no fp32 dC accumulator is needed;
- ``pair_de_kernel``, grid (row block, D tile): dE[block] += sum over the block's kept tiles of this batch of
  dS @ c[tile] into an fp32 accumulator (stored on the first batch).

Like ``sparse_grads.py`` (speed mode), each walk is one flat loop over (kept item, K step) whose length comes
from a count on the device; the loads are pointer loads of contiguous slot tiles and of c / e rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..filtering import BM, BV
from ..precision import is_ieee_fp32
from . import tiles
from .grad_kernel import logit_grad
from .jit_common import accumulate_dot, logit_tile, row_targets
from .sparse_grads import sparse_tiles
from .tiles import TileConfig


def pair_tile_config(dtype: torch.dtype) -> TileConfig:
    """The recompute's tile is the filter's pair, BM x BV; K steps, warps and stages as memory mode's exact
    logit-gradient kernel (whose bf16 tile on the GPU is the same 128 x 256)."""
    if tiles.INTERPRETING:
        return TileConfig(BM, BV, 32, 4, 1)
    exact = tiles.tile_config(dtype, "backward")
    return TileConfig(BM, BV, exact.block_k, exact.num_warps, exact.num_stages)


@triton.jit
def pair_logit_grad_kernel(
    E, C, BIAS, T, LSE, G, H, DS, PAIR_BLOCK, PAIR_TILE, first_pair,
    N, V, D, stride_e, stride_c, ignore_index, softcap, smoothing,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_H: tl.constexpr, UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per kept pair of the batch: slot s holds pair first_pair + s. Targets are the gathered,
    already shifted ones (ignored rows hold ignore_index)."""
    slot = tl.program_id(0)
    pair = first_pair + slot
    m0 = tl.load(PAIR_BLOCK + pair) * BLOCK_M
    n0 = tl.load(PAIR_TILE + pair) * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tgt, valid = row_targets(T, offs_m, N, 0, ignore_index)
    row_ok = offs_m < N
    z = logit_tile(E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap,
                   HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_FP32, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    # inv_vocab = 0: the uniform smoothing term is the caller's rank-one term; the target's (1 - a) g stays
    ds = logit_grad(z, offs_m, offs_n, tgt, valid, row_ok, LSE, G, H, G, softcap, smoothing, 0.0, 1.0,
                    HAS_H, HAS_SOFTCAP, False, False)
    ds = tl.where((offs_n < V)[None, :], ds, 0.0)  # columns past V are products with zero-filled rows of c
    ptrs = DS + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N \
        + tl.arange(0, BLOCK_N)[None, :]
    tl.store(ptrs, ds.to(DS.dtype.element_ty))


@triton.jit
def pair_dc_kernel(
    DS, E, DC, SMOOTH, PAIR_BLOCK, TILE_START, BLOCK_COUNTS, first_pair, first_tile,
    N, V, D, stride_e, stride_dc,
    HAS_SMOOTH: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dC[tile] (BV x BLOCK_D) = sum over the tile's kept blocks b of dS[b, tile]^T @ e[rows of b] (- SMOOTH)."""
    tile = first_tile + tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_v = tile * BV + tl.arange(0, BV)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(TILE_START + tile) - first_pair  # the tile's first slot in this batch
    count = tl.load(BLOCK_COUNTS + tile)
    r_steps = BM // BLOCK_K
    acc = tl.zeros((BV, BLOCK_D), dtype=tl.float32)
    for it in range(0, count * r_steps):
        j = it // r_steps
        r0 = (it - j * r_steps) * BLOCK_K
        slot = (start + j).to(tl.int64)
        row0 = tl.load(PAIR_BLOCK + first_pair + slot) * BM + r0
        offs_r = r0 + tl.arange(0, BLOCK_K)
        ds_t = tl.load(DS + slot * (BM * BV) + offs_r[None, :] * BV + tl.arange(0, BV)[:, None])
        rows = row0 + tl.arange(0, BLOCK_K)
        e = tl.load(E + rows.to(tl.int64)[:, None] * stride_e + offs_d[None, :],
                    mask=(rows < N)[:, None] & d_ok[None, :], other=0.0)
        acc = accumulate_dot(ds_t, e, acc, UPCAST, IEEE_FP32)
    if HAS_SMOOTH:
        acc -= tl.load(SMOOTH + offs_d, mask=d_ok, other=0.0)[None, :]
    tl.store(DC + offs_v.to(tl.int64)[:, None] * stride_dc + offs_d[None, :], acc.to(DC.dtype.element_ty),
             mask=(offs_v < V)[:, None] & d_ok[None, :])


@triton.jit
def pair_de_kernel(
    DS, C, DE, SLOTS_OF_BLOCK, TILES_OF_BLOCK, LO, HI, first_pair,
    N, V, D, T, stride_c, stride_de,
    FIRST: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """DE[rows of b] (fp32) = (FIRST ? 0 : DE) + sum over the block's kept tiles in this batch (entries LO[b] ..
    HI[b] of its lists) of dS[b, tile] @ c[tile]."""
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lo = tl.load(LO + b)
    count = tl.load(HI + b) - lo
    k_steps = BV // BLOCK_K
    acc = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
    for it in range(0, count * k_steps):
        j = lo + it // k_steps
        k0 = (it % k_steps) * BLOCK_K
        entry = b.to(tl.int64) * T + j
        slot = (tl.load(SLOTS_OF_BLOCK + entry) - first_pair).to(tl.int64)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ds = tl.load(DS + slot * (BM * BV) + tl.arange(0, BM)[:, None] * BV + offs_k[None, :])
        offs_v = tl.load(TILES_OF_BLOCK + entry) * BV + offs_k
        c = tl.load(C + offs_v.to(tl.int64)[:, None] * stride_c + offs_d[None, :],
                    mask=(offs_v < V)[:, None] & d_ok[None, :], other=0.0)
        acc = accumulate_dot(ds, c, acc, UPCAST, IEEE_FP32)
    rows = b * BM + tl.arange(0, BM)
    ptrs = DE + rows.to(tl.int64)[:, None] * stride_de + offs_d[None, :]
    mask = (rows < N)[:, None] & d_ok[None, :]
    if FIRST:
        tl.store(ptrs, acc, mask=mask)
    else:
        if count > 0:  # a block with nothing kept in this batch leaves its rows as they are
            tl.store(ptrs, acc + tl.load(ptrs, mask=mask, other=0.0), mask=mask)


def _flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=tiles.INTERPRETING and dtype != torch.float32, IEEE_FP32=is_ieee_fp32(dtype))


def pair_logit_grads(ds: torch.Tensor, e_rows: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None,
                     pair_block: torch.Tensor, pair_tile: torch.Tensor, first_pair: int, pairs: int,
                     ignore_index: int, softcap: float | None, smoothing: float) -> None:
    """Fill slots 0 .. pairs - 1 of ``ds`` ((slots, BM, BV) in the input dtype) with the dS tiles of pairs
    ``first_pair ..`` of the tile-major lists ``pair_block`` / ``pair_tile``; rows of ``e_rows``, ``targets``,
    ``lse``, ``g`` and ``h`` in the filter's row order."""
    if pairs == 0:
        return
    n, d = e_rows.shape
    cfg = pair_tile_config(e_rows.dtype)
    e_arg, c_arg, use_tma = tiles.matmul_operands(e_rows, c, cfg)
    pair_logit_grad_kernel[(pairs,)](
        e_arg, c_arg, bias if bias is not None else e_rows, targets, lse, g, h if h is not None else g, ds,
        pair_block, pair_tile, first_pair,
        n, c.shape[0], d, e_rows.stride(0), c.stride(0), ignore_index, float(softcap or 1.0), float(smoothing),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_H=h is not None,
        EVEN_K=d % cfg.block_k == 0, USE_TMA=use_tma, BLOCK_M=BM, BLOCK_N=BV, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(e_rows.dtype),
    )


def pair_dc(dc: torch.Tensor, ds: torch.Tensor, e_rows: torch.Tensor, smooth: torch.Tensor | None,
            pair_block: torch.Tensor, tile_start: torch.Tensor, block_counts: torch.Tensor, first_pair: int,
            tiles_range: tuple[int, int]) -> None:
    """Write dC's rows of the tiles in ``tiles_range`` (every kept block of each is in this batch's slots)."""
    k0, k1 = tiles_range
    n, d = e_rows.shape
    cfg = sparse_tiles(e_rows.dtype)
    pair_dc_kernel[(k1 - k0, triton.cdiv(d, cfg.block_d))](
        ds, e_rows, dc, smooth if smooth is not None else e_rows, pair_block, tile_start, block_counts,
        first_pair, k0, n, dc.shape[0], d, e_rows.stride(0), dc.stride(0),
        HAS_SMOOTH=smooth is not None, BM=BM, BV=BV, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(e_rows.dtype),
    )


def pair_de(de_acc: torch.Tensor, ds: torch.Tensor, c: torch.Tensor, slots_of_block: torch.Tensor,
            tiles_of_block: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, first_pair: int, first: bool) -> None:
    """Add (store, when ``first``) each row block's products over its kept tiles of this batch into ``de_acc``
    ((N, D) fp32, the filter's row order)."""
    n, d = de_acc.shape
    blocks, t = slots_of_block.shape
    cfg = sparse_tiles(c.dtype)
    pair_de_kernel[(blocks, triton.cdiv(d, cfg.block_d))](
        ds, c, de_acc, slots_of_block, tiles_of_block, lo, hi, first_pair, n, c.shape[0], d, t, c.stride(0),
        de_acc.stride(0), FIRST=first, BM=BM, BV=BV, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(c.dtype),
    )
