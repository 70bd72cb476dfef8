"""Block-sparse gradient products of filtered speed mode: only the kept (row block, vocabulary tile) pairs.

Speed mode forms a chunk's gradients from q (rows x V, the unnormalised probabilities, ``speed_mode.py``) with
two dense GEMMs: dE_rows ~ Q @ C and dC ~ Q^T @ AE (AE = w a E in the input dtype). With a gradient filter
(``ops/filtering.py``, decided per chunk in ``filter_plan.py``) the skipped pairs contribute nothing, so these
kernels walk only the kept ones:

- ``sparse_de_kernel``, grid (row block b, D tile): acc (BM x BD, fp32) = sum over the kept tiles k of block b
  of Q[rows_b, tile k] @ C[tile k, D tile], the K dimension being the BV vocabulary entries of the tile in steps
  of BK. rows_b are the block's rows in the chunk's row order (a gathered load: blocks are formed from rows
  sorted by confidence, not from consecutive rows). The fp32 product is written to the rows' places; the
  caller applies the same per-row scaling and target terms as the dense path.
- ``sparse_dc_kernel``, grid (tile k, D tile): acc (BV x BD, fp32) = sum over the kept blocks b of tile k of
  Q[rows_b, tile k]^T @ AE[rows_b, D tile]; written once per chunk by its one program (no atomics): stored on
  the first chunk (zeros where no block keeps the tile), else added to what is there and rounded once, as
  the dense path's cuBLAS call does (``gemm.mm_accumulate``).

Both loops are one flat loop over (kept item, K step), whose length is read from the count of the program's
list (a padded index list: no host sync to build or to launch). Pointer loads (the rows are gathered, so the
copy engine's rectangular tiles do not apply to Q's rows here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..filtering import BM, BV
from ..precision import is_ieee_fp32
from . import tiles
from .filter_plan import ChunkFilter
from .jit_common import accumulate_dot

#: Most programs that share one row block's kept tiles in ``sparse_de`` (see ``de_splits``): 8 shares of a
#: 4096-row chunk at D = 2304 hold a 302 MB fp32 buffer of partial sums, next to that chunk's 2 GB of q.
MAX_DE_SPLITS = 8


@dataclass(frozen=True)
class SparseTiles:
    """Tile shapes of the two kernels (BM and BV are the filter's: one program per block or tile)."""

    block_d: int
    block_k: int
    num_warps: int
    num_stages: int


def sparse_tiles(dtype: torch.dtype) -> SparseTiles:
    """BD x BK steps feeding the tensor cores with 8 warps on the GPU (fp32 halves K to fit shared memory);
    small D tiles in the interpreter, so that test shapes cover partial ones."""
    if tiles.INTERPRETING:
        return SparseTiles(32, 32, 4, 1)
    if dtype == torch.float32:
        return SparseTiles(128, 32, 8, 3)
    return SparseTiles(128, 64, 8, 3)


@triton.jit
def sparse_de_kernel(
    Q, C, OUT, ORDER, TILES_OF_BLOCK, TILE_COUNTS,
    rows, V, D, T, stride_q, stride_c, stride_out, stride_split, SPLITS,
    UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    pid_d = tl.program_id(1)
    offs_r = b * BM + tl.arange(0, BM)
    r_ok = offs_r < rows
    row = tl.load(ORDER + offs_r, mask=r_ok, other=0).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_steps = BV // BLOCK_K  # constexpr: K steps per vocabulary tile
    count = tl.load(TILE_COUNTS + b)
    per_split = tl.cdiv(count, SPLITS)  # this program's contiguous share of the block's kept tiles
    first = split * per_split
    mine = tl.minimum(count - first, per_split)
    acc = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
    for it in range(0, tl.maximum(mine, 0) * k_steps):
        i = first + it // k_steps
        tile = tl.load(TILES_OF_BLOCK + b.to(tl.int64) * T + i)
        offs_v = tile * BV + (it % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        v_ok = offs_v < V
        q = tl.load(Q + row[:, None] * stride_q + offs_v[None, :], mask=r_ok[:, None] & v_ok[None, :], other=0.0)
        c = tl.load(C + offs_v.to(tl.int64)[:, None] * stride_c + offs_d[None, :],
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        acc = accumulate_dot(q, c, acc, UPCAST, IEEE_FP32)
    tl.store(OUT + split.to(tl.int64) * stride_split + row[:, None] * stride_out + offs_d[None, :], acc,
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def sparse_dc_kernel(
    Q, AE, OUT, ORDER, BLOCKS_OF_TILE, BLOCK_COUNTS,
    rows, V, D, B, stride_q, stride_ae, stride_out,
    FIRST: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_v = tile * BV + tl.arange(0, BV)
    v_ok = offs_v < V
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r_steps = BM // BLOCK_K  # constexpr: K steps per row block
    count = tl.load(BLOCK_COUNTS + tile)
    acc = tl.zeros((BV, BLOCK_D), dtype=tl.float32)
    for it in range(0, count * r_steps):
        j = it // r_steps
        blk = tl.load(BLOCKS_OF_TILE + tile.to(tl.int64) * B + j)
        offs_r = blk * BM + (it - j * r_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_ok = offs_r < rows
        row = tl.load(ORDER + offs_r, mask=r_ok, other=0).to(tl.int64)
        qt = tl.load(Q + row[None, :] * stride_q + offs_v[:, None], mask=v_ok[:, None] & r_ok[None, :], other=0.0)
        ae = tl.load(AE + row[:, None] * stride_ae + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc = accumulate_dot(qt, ae, acc, UPCAST, IEEE_FP32)
    ptrs = OUT + offs_v.to(tl.int64)[:, None] * stride_out + offs_d[None, :]
    mask = v_ok[:, None] & d_ok[None, :]
    if FIRST:  # zeros where no block keeps the tile
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        if count > 0:  # a later chunk that keeps nothing here leaves the tile as it is (no read, no write)
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


def _flags(q: torch.Tensor) -> dict:
    return dict(UPCAST=tiles.INTERPRETING and q.dtype != torch.float32, IEEE_FP32=is_ieee_fp32(q.dtype), BM=BM, BV=BV)


def de_splits(kept_pairs: int, most_kept: int, blocks: int) -> int:
    """How many programs share one row block's kept tiles in ``sparse_de``.

    Why: rows grouped by confidence make the kept counts very uneven (H100, lm regime, paper shape, eps 2^-12:
    median 7 tiles per block, the flattest block all 1000), and a block's programs walk its list serially, so the
    kernel took as long as that one block's walk (4.6 ms a chunk for 16% of the dense work, which cuBLAS does in
    6.1 ms). Splitting every block's list into ``splits`` contiguous shares cuts that walk by as much, at the cost
    of a (splits, rows, D) fp32 buffer of partial sums, added up in a fixed order (deterministic). The split is
    sized so that the longest share is about twice the mean count, at most ``MAX_DE_SPLITS``."""
    mean = max(1.0, kept_pairs / max(blocks, 1))
    return max(1, min(MAX_DE_SPLITS, math.ceil(most_kept / (2.0 * mean))))


def sparse_de(q: torch.Tensor, c: torch.Tensor, plan: ChunkFilter, splits: int = 1) -> torch.Tensor:
    """(rows, D) fp32: Q @ C over the kept pairs of ``plan`` only (rows in the chunk's own order; a row whose
    block keeps nothing gets 0). ``q`` (rows, V) and ``c`` (V, D) with unit column stride. ``splits`` programs
    share each block's list (``de_splits``); their partial sums are added in split order."""
    rows, vocab = q.shape
    d = c.shape[1]
    out = torch.empty((splits, rows, d), dtype=torch.float32, device=q.device)
    cfg = sparse_tiles(q.dtype)
    grid = (plan.blocks * splits, triton.cdiv(d, cfg.block_d))
    sparse_de_kernel[grid](
        q, c, out, plan.order, plan.tiles_of_block, plan.tile_counts,
        rows, vocab, d, plan.skipped.shape[1], q.stride(0), c.stride(0), out.stride(1), out.stride(0), splits,
        BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(q),
    )
    if splits == 1:
        return out[0]
    total = out[0]
    for k in range(1, splits):  # a fixed order: the same sums on every run
        total += out[k]
    return total


def sparse_dc_accumulate(out: torch.Tensor, q: torch.Tensor, ae: torch.Tensor, plan: ChunkFilter, first: bool) -> None:
    """out = Q^T @ AE over the kept pairs (``first``), else out += it, rounded once to out's dtype per element.
    ``out`` (V, D) (the input dtype or an fp32 accumulator), ``q`` (rows, V), ``ae`` (rows, D) in q's dtype."""
    rows, vocab = q.shape
    d = ae.shape[1]
    cfg = sparse_tiles(q.dtype)
    grid = (plan.skipped.shape[1], triton.cdiv(d, cfg.block_d))
    sparse_dc_kernel[grid](
        q, ae, out, plan.order, plan.blocks_of_tile, plan.block_counts,
        rows, vocab, d, plan.blocks, q.stride(0), ae.stride(0), out.stride(0),
        FIRST=first, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_flags(q),
    )
