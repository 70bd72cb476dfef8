"""Speed mode's per-row preparation in one kernel: each row's counted target and its exponent anchor.

Why a kernel for rows x D of work: speed mode's first storing launch waits on these values, and the GPU is
idle from the target check's host sync until that launch. Built from torch ops (the causal shift, the
ignore mask, a gather of c's target rows, a row-wise dot, softcap, the margin) it was ~25 small launches,
each costing more host time than GPU time: ~1.5 ms of an idle GPU per call on an H100 host (KERNEL_NOTES.md,
v6). One launch does all of it.

Per row i (``speed_mode.py`` has the math of the anchor):
    t_i    = target after the shift, or ignore_index where the row does not count (also out-of-range targets,
             so that an unchecked bad target cannot read outside c)
    anchor_i = softcap(e_i . c_{t_i} + b_{t_i}) + margin   (fp32), +inf where the row does not count
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import LossSpec
from .jit_common import accurate_tanh, row_targets


@triton.jit
def row_prep_kernel(
    E, C, BIAS, T, T_OUT, ANCHOR, N, V, D, stride_e, stride_c, shift_period, ignore_index, softcap, margin,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    tgt, valid = row_targets(T, offs_m, N, shift_period, ignore_index)
    valid = valid & (tgt >= 0) & (tgt < V)
    t_safe = tl.where(valid, tgt, 0)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        e = tl.load(E + offs_m.to(tl.int64)[:, None] * stride_e + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(C + t_safe[:, None] * stride_c + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
        z += tl.sum(e.to(tl.float32) * c.to(tl.float32), axis=1)
    if HAS_BIAS:
        z += tl.load(BIAS + t_safe, mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:  # the same tanh as jit_common.finish_logits
        z = softcap * accurate_tanh(z / softcap)
    tl.store(T_OUT + offs_m, tl.where(valid, tgt, ignore_index), mask=row_ok)
    tl.store(ANCHOR + offs_m, tl.where(valid, z + margin, float("inf")), mask=row_ok)


def prepare_rows(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets_flat: torch.Tensor,
                   spec: LossSpec, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) int64 counted targets, ignore_index elsewhere; (N,) fp32 anchor) in one launch."""
    n, d = e2d.shape
    tgt = torch.empty(n, dtype=torch.int64, device=e2d.device)
    anchor = torch.empty(n, dtype=torch.float32, device=e2d.device)
    block_m = 32 if e2d.is_cuda else 16  # 16 x 128 work per step; a few hundred programs at N=8192
    row_prep_kernel[(triton.cdiv(n, block_m),)](
        e2d, c, bias if bias is not None else e2d, targets_flat, tgt, anchor,
        n, c.shape[0], d, e2d.stride(0), c.stride(0), spec.shift_period, spec.ignore_index,
        float(spec.softcap or 1.0), float(margin),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=spec.softcap is not None, BLOCK_M=block_m, BLOCK_D=128,
        num_warps=4,
    )
    return tgt, anchor
