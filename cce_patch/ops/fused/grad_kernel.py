"""Backward kernel: the gradient of the loss with respect to the logits, one vocabulary chunk at a time.

Math, for a tile of rows i and columns j of the chunk (see spec.py):
    z_ij  = softcap(e_i . c_j + b_j)        recomputed exactly as in the forward kernel
    p_ij  = exp(z_ij - lse_i)
    dz_ij = g_i * (p_ij - (1 - a) [j == t_i] - a / V) + h_i * p_ij
    dS_ij = dz_ij * (1 - (z_ij / softcap)^2)   (softcap only)
The per-token statistics (``ops/stats.py``) add, behind flags that are off on the loss path, a term
r_i p_ij (z_ij - lse_i) for the entropy's gradient (HAS_R) and the factor alpha of z = softcap(alpha (e.c + b))
(HAS_SCALE: the products are scaled before the pre-scaled bias, dS is multiplied by alpha).
Reads e, c, bias, targets, lse, g, h; writes dS for the chunk, (N x chunk) in the input dtype (fp32 for fp32
inputs). The two big products dC[chunk] = dS^T e and dE += dS c[chunk] then run through cuBLAS: the GEMMs are
the bulk of the work, and cuBLAS does them at full speed while the Triton kernel fuses every elementwise
step into the recompute's epilogue. Memory: one dS chunk (bounded by a byte budget) plus the fp32 dE
accumulator, on top of the gradients themselves.
Grid: 1-D over (row block, column tile of the chunk), grouped GROUP_M row blocks at a time (see
``jit_common.grouped_pid``); row blocks whose targets are all ignored write zeros and skip the matmul.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_common import grouped_pid, row_targets
from .lse_kernel import scaled_logit_tile


@triton.jit
def logit_grad(z, offs_m, offs_n, tgt, valid, row_ok, LSE, G, H, R, softcap, smoothing, inv_vocab, logit_scale,
               HAS_H: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_R: tl.constexpr, HAS_SCALE: tl.constexpr):
    """dS for one tile of logits z (rows offs_m, vocabulary columns offs_n); 0 on ignored rows."""
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    g = tl.where(valid, tl.load(G + offs_m, mask=row_ok, other=0.0), 0.0)
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (p - smoothing * inv_vocab)
    dz -= tl.where(offs_n[None, :] == tgt[:, None], ((1.0 - smoothing) * g)[:, None], 0.0)
    if HAS_H:
        h = tl.where(valid, tl.load(H + offs_m, mask=row_ok, other=0.0), 0.0)
        dz += h[:, None] * p
    if HAS_R:  # the entropy's gradient: r_i p_ij log p_ij
        r = tl.where(valid, tl.load(R + offs_m, mask=row_ok, other=0.0), 0.0)
        dz += r[:, None] * p * (z - lse[:, None])
    if HAS_SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    if HAS_SCALE:
        dz = dz * logit_scale
    return tl.where(valid[:, None], dz, 0.0)


@triton.jit
def logit_grad_kernel(
    E, C, BIAS, T, LSE, G, H, DS,
    N, V, D, stride_e, stride_c, stride_ds, v_start, chunk_cols, shift_period, ignore_index, softcap,
    smoothing, inv_vocab, GROUP_M,
    R, logit_scale,  # per-token statistics only (HAS_R, HAS_SCALE)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_H: tl.constexpr, UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_R: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """One program per dS tile; row blocks whose targets are all ignored skip the matmul."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(chunk_cols, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = v_start + offs_local
    tgt, valid = row_targets(T, offs_m, N, shift_period, ignore_index)
    row_ok = offs_m < N
    col_ok = offs_local < chunk_cols
    ds_ptrs = DS + offs_m.to(tl.int64)[:, None] * stride_ds + offs_local[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.sum(valid.to(tl.int32), axis=0) > 0:
        z = scaled_logit_tile(E, C, BIAS, pid_m * BLOCK_M, v_start + pid_n * BLOCK_N, N, V, D, stride_e, stride_c,
                              softcap, logit_scale, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, UPCAST, IEEE_FP32, EVEN_K,
                              USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
        ds = logit_grad(z, offs_m, offs_n, tgt, valid, row_ok, LSE, G, H, R, softcap, smoothing, inv_vocab,
                        logit_scale, HAS_H, HAS_SOFTCAP, HAS_R, HAS_SCALE)
    tl.store(ds_ptrs, ds.to(DS.dtype.element_ty), mask=out_mask)
