"""Memory mode on the Triton backend: the fused forward, and a backward that recomputes the logits in chunks.

Forward: one fused kernel (``lse_kernel.lse_forward_kernel``) streams e @ c.T tile by tile and keeps only
per-row statistics, so no logit is ever stored. Backward: for each vocabulary chunk (and, past 16k tokens,
each row group inside it: ``ds_chunk_shape``), a fused kernel recomputes the logit tile and writes the logit
gradient dS (``grad_kernel.logit_grad_kernel``); then cuBLAS computes dC[chunk] = dS^T e (written in
place, or summed over the row groups in fp32 first) and dE += dS c[chunk] (fp32 accumulator). Exact
gradients: nothing is filtered or skipped except rows whose targets are ignored.

The per-token statistics (``ops/stats.py``) run through the same two kernels: ``stats_forward`` launches the
forward with its statistics flags, and ``backward`` takes the entropy's extra per-row coefficient and the
logit factor alpha (``grad_plogp``, ``logit_scale``); with neither, the launches are the loss path's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton

from ..spec import LossSpec, effective_targets, valid_rows
from ..stats import StatsSpec
from . import tiles
from .gemm import mm_accumulate, mm_into
from .grad_kernel import logit_grad_kernel
from .lse_kernel import combine_partials, combine_stats, launch_lse_forward
from .tiles import TileConfig

#: Bytes allowed for one chunk of the logit gradient dS. 128 MiB keeps fwd+bwd memory at the paper shape
#: (N=8192, V=256000, bf16) within 1.25x of the gradients (8192 x 8192 x 2 B = 128 MiB per chunk).
DS_CHUNK_BYTES = 128 * 1024 * 1024


def forward(e2d, c, bias, targets_flat, spec: LossSpec, log_mass=None):
    """Per-row (loss, lse), fp32 (N,), zero on ignored rows. ``log_mass``: a buffer the kernel fills with the
    rows' log tile masses on the way (``memory_filter.forward``: the filter's statistics), or None."""
    part, zt = launch_lse_forward(e2d, c, bias, targets_flat, spec, mass=log_mass)
    valid = valid_rows(targets_flat, spec)[: e2d.shape[0]]
    return combine_partials(part, zt, valid, spec.label_smoothing, c.shape[0])


def stats_forward(e2d, c, bias, targets_flat, spec: LossSpec, stats: StatsSpec):
    """Per-row (log_probs, lse, entropy, log_sum_sq_probs, mean_logits, is_top1) of ``ops/stats.py``; the
    fields ``stats`` does not ask for are None."""
    part, zt = launch_lse_forward(e2d, c, bias, targets_flat, spec, stats=stats)
    valid = valid_rows(targets_flat, spec)[: e2d.shape[0]]
    return combine_stats(part, zt, valid, stats, c.shape[0])


def ds_chunk_shape(n: int, v: int, itemsize: int, budget: int, cfg: TileConfig) -> tuple[int, int]:
    """(rows, columns) of one dS chunk of at most ``budget`` bytes: the backward's unit of work.

    Why two dimensions: every vocabulary chunk reads and writes the fp32 dE accumulator of its rows once
    (rows x D x 8 B), and with row groups every row group reads and writes the fp32 dC accumulator of its
    columns once. Over the whole problem that is 8 N D V (1/cols + 1/rows) bytes, smallest for a square chunk.
    Taking all N rows at once (one row group, dC written straight into the gradient, no dC accumulator) is
    as good up to N = 2 sqrt(budget / itemsize) = 16,384 for 128 MiB of bf16 (and saves the dC accumulator);
    beyond it a fixed budget would shrink the columns as 1/N and make the accumulator traffic grow as N^2
    (measured: +22% time per token at N=65,536 with 1,024-column chunks). So past that, rows come in balanced
    groups of at most the square side."""
    side = max(cfg.block_m, math.isqrt(max(1, budget // itemsize)) // cfg.block_m * cfg.block_m)
    # One group costs n / budget per element of N D V, groups of `side` rows 2 / side: equal at n = 2 side.
    groups = 1 if n <= 2 * side else triton.cdiv(n, side)
    rows = n if groups == 1 else triton.cdiv(triton.cdiv(n, groups), cfg.block_m) * cfg.block_m
    cols = max(cfg.block_n, budget // (rows * itemsize) // cfg.block_n * cfg.block_n)
    return rows, min(cols, triton.cdiv(v, cfg.block_n) * cfg.block_n)


def _fp16_scale(e2d, grad_loss, grad_lse, grad_plogp=None):
    """fp16 has a narrow range: g * (p - onehot) with g = 1/N and p ~ 1/V is far below its smallest normal.
    The kernel stores dS / max|g| instead (entries of order p - onehot) and the GEMM results are multiplied
    back. bf16 and fp32 share fp32's exponent range and need no scale. Returns (scale or None, g, h, r)."""
    if e2d.dtype != torch.float16:
        return None, grad_loss, grad_lse, grad_plogp
    peak = grad_loss.abs().max()
    for extra in (grad_lse, grad_plogp):
        if extra is not None:
            peak = torch.maximum(peak, extra.abs().max())
    scale = peak.clamp_min(torch.finfo(torch.float32).tiny)

    def scaled(x):
        return x / scale if x is not None else None

    return scale, grad_loss / scale, scaled(grad_lse), scaled(grad_plogp)


def backward(e2d, c, bias, targets_flat, spec: LossSpec, lse, grad_loss, grad_lse, needs,
             grad_plogp=None, logit_scale: float = 1.0):
    """(dE, dC, dbias) in the input dtypes, for those in ``needs``.

    ``grad_plogp`` (per-row r of r p log p, the entropy's gradient) and ``logit_scale`` (alpha) are the
    per-token statistics' (``ops/stats.py``); the loss path passes neither.

    Loops over vocabulary chunks and, when N is large, row groups within each chunk (``ds_chunk_shape``):
    the kernel writes dS for (row group, chunk), then cuBLAS adds dS c[chunk] into the fp32 dE accumulator
    of the group's rows and dS^T e[group] into dC[chunk] (directly with one row group, else through an fp32
    chunk accumulator that is rounded into dC once the chunk's last group is done)."""
    need_de, need_dc, need_db = needs
    n, d = e2d.shape
    v = c.shape[0]
    cfg = tiles.tile_config(e2d.dtype, "backward")
    rows, cols = ds_chunk_shape(n, v, e2d.element_size(), DS_CHUNK_BYTES, cfg)
    grouped = rows < n
    if grouped:  # group boundaries need not fall on sequence boundaries: shift once, then unshifted groups
        targets_flat = effective_targets(targets_flat, spec)
        spec = replace(spec, shift_period=0)
    ds_buf = torch.empty((rows, cols), dtype=e2d.dtype, device=e2d.device)
    de_acc = torch.empty((n, d), dtype=torch.float32, device=e2d.device) if need_de else None
    dc = torch.empty_like(c) if need_dc else None
    dc_acc = torch.empty((cols, d), dtype=torch.float32, device=c.device) if need_dc and grouped else None
    db_acc = torch.zeros(v, dtype=torch.float32, device=bias.device) if need_db else None
    scale, grad_loss, grad_lse, grad_plogp = _fp16_scale(e2d, grad_loss, grad_lse, grad_plogp)
    bias_arg = bias if bias is not None else e2d
    if bias is not None and logit_scale != 1.0:  # the kernel adds alpha * b to alpha * (e . c), as the forward
        bias_arg = bias.float() * logit_scale
    # (first row, end row, tile operands) per row group; descriptors are built once, not per chunk
    groups = [(r0, min(n, r0 + rows), tiles.matmul_operands(e2d[r0:r0 + rows], c, cfg)) for r0 in range(0, n, rows)]
    for v0 in range(0, v, cols):
        width = min(cols, v - v0)
        for r0, r1, (e_arg, c_arg, use_tma) in groups:
            ds = ds_buf[: r1 - r0, :width]
            logit_grad_kernel[(triton.cdiv(r1 - r0, cfg.block_m) * triton.cdiv(width, cfg.block_n),)](
                e_arg, c_arg, bias_arg, targets_flat[r0:], lse[r0:], grad_loss[r0:],
                grad_lse[r0:] if grad_lse is not None else grad_loss, ds,
                r1 - r0, v, d, e2d.stride(0), c.stride(0), ds_buf.stride(0), v0, width, spec.shift_period,
                spec.ignore_index, float(spec.softcap or 1.0), float(spec.label_smoothing), 1.0 / v, cfg.group_m,
                grad_plogp[r0:] if grad_plogp is not None else grad_loss, float(logit_scale),
                HAS_H=grad_lse is not None, USE_TMA=use_tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **tiles.kernel_flags(e2d, bias, spec, cfg),
                HAS_R=grad_plogp is not None, HAS_SCALE=logit_scale != 1.0,
            )
            if dc_acc is not None:
                mm_accumulate(dc_acc[:width], ds.T, e2d[r0:r1], first=r0 == 0)
            elif dc is not None:
                mm_into(dc[v0:v0 + width], ds.T, e2d, scale)
            if de_acc is not None:
                mm_accumulate(de_acc[r0:r1], ds, c[v0:v0 + width], first=v0 == 0)
            if db_acc is not None:
                db_acc[v0:v0 + width] += torch.sum(ds, 0, dtype=torch.float32)
        if dc_acc is not None:  # the chunk's last row group is in: round its columns of dC once
            dc[v0:v0 + width] = (dc_acc[:width] * scale if scale is not None else dc_acc[:width]).to(dc.dtype)
    if scale is not None:
        for acc in (de_acc, db_acc):
            if acc is not None:
                acc.mul_(scale)
    de = de_acc.to(e2d.dtype) if de_acc is not None else None
    db = db_acc.to(bias.dtype) if db_acc is not None else None
    return de, dc, db
