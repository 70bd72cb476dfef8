"""Forward kernel: per-row log-sum-exp, target logit and logit sum, without storing any logit.

Math, for rows i of a BLOCK_M block and the vocabulary slice [v_lo, v_hi) owned by one program:
    z_ij   = softcap(e_i . c_j + b_j)                 (fp32, one BLOCK_M x BLOCK_N tile at a time)
    m_i    = max_j z_ij,  s_i = sum_j exp(z_ij - m_i) (online: rescaled as m_i grows)
    zt_i   = z_{i, t_i} if t_i in the slice else 0
    zsum_i = sum_j z_ij                              (only for label smoothing)
Reads e (N x D) and c (V x D) once per tile pass; writes 4 floats per row per vocabulary split, so memory
is O(N * splits): 2 MB at N=8192 with 16 splits. The splits are combined in ``combine_partials``.
Grid: (row blocks, vocabulary splits), rows fastest so programs running together share c's slice in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import logit_tile, row_targets


@triton.jit
def lse_forward_kernel(
    E, C, BIAS, T, PART,  # PART: (4, splits, N) fp32 -> m, s, zt, zsum
    N, V, D, stride_e, stride_c, shift_period, ignore_index, softcap, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_ZSUM: tl.constexpr, UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tgt, valid = row_targets(T, offs_m, N, shift_period, ignore_index)
    out = PART + pid_s.to(tl.int64) * N + offs_m
    plane = n_splits.to(tl.int64) * N
    row_ok = offs_m < N
    # A block whose rows are all ignored (prompt tokens, padding) does no matmul work at all.
    any_valid = tl.sum(valid.to(tl.int32), axis=0) > 0
    n_tiles = tl.where(any_valid, tiles_per_split, 0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(0, n_tiles):
        offs_n = (pid_s * tiles_per_split + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        z = logit_tile(E, C, BIAS, offs_m, offs_n, N, V, D, stride_e, stride_c, softcap,
                       HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_FP32, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        col_ok = offs_n[None, :] < V
        if NEED_ZSUM:
            zsum_i += tl.sum(tl.where(col_ok, z, 0.0), axis=1)
        zt_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + plane, s_i, mask=row_ok)
    tl.store(out + 2 * plane, zt_i, mask=row_ok)
    tl.store(out + 3 * plane, zsum_i, mask=row_ok)


def combine_partials(part: torch.Tensor, valid: torch.Tensor, label_smoothing: float, vocab: int):
    """Merge per-split (m, s, zt, zsum) into per-row (loss, lse); ignored rows get exactly 0."""
    m, s, zt, zsum = part.unbind(0)  # each (splits, N)
    m_max = m.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    lse = m_safe + torch.log((s * torch.exp(m - m_safe)).sum(dim=0))
    loss = lse - (1.0 - label_smoothing) * zt.sum(dim=0)
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * zsum.sum(dim=0)
    zero = torch.zeros_like(lse)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)
