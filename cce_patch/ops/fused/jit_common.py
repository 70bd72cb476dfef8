"""Pieces shared by the forward and backward kernels: target lookup under shifting, the logit epilogue.

Both kernels compute the same logit tile ``z = softcap(e_rows @ c_cols.T + bias)``; keeping that code in
one ``@triton.jit`` helper guarantees the backward recomputes exactly what the forward reduced.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_targets(T, offs_m, N, shift_period, ignore_index):
    """Target of each row and whether the row counts. Shifting reads ``T[i + 1]`` (no copy of T) and drops
    the last row of every sequence; out-of-range rows read nothing."""
    in_range = offs_m < N
    if shift_period > 0:
        t_idx = offs_m + 1
        keep = in_range & ((t_idx % shift_period) != 0)
    else:
        t_idx = offs_m
        keep = in_range
    tgt = tl.load(T + t_idx, mask=keep, other=ignore_index).to(tl.int64)
    valid = keep & (tgt != ignore_index)
    return tgt, valid


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M):
    """Map a 1-D program id to (row block, column block), GROUP_M row blocks at a time with rows fastest.

    Programs that run together then read the same column tile of c (each tile fetched from DRAM about once
    per group) and a bounded set of e's rows that L2 can hold (GROUP_M x BLOCK_M x D)."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def dot_step(
    E, C, acc, m0, n0, k0, N, V, D, stride_e, stride_c,
    UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + E[m0:+BLOCK_M, k0:+BLOCK_K] @ C[n0:+BLOCK_N, k0:+BLOCK_K].T (fp32 accumulator).

    With USE_TMA, E and C are tensor descriptors (blocks [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]): Hopper's
    copy engine fetches the tiles, zero-filling rows past N or V and columns past D, with no address
    arithmetic in the threads. Otherwise they are pointers, and row offsets are widened to int64 before
    multiplying by the strides (N*D and V*D can exceed 2**31, e.g. 65536 tokens x 5120 hidden)."""
    if USE_TMA:
        a = E.load([m0, k0])
        b = C.load([n0, k0]).T
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        e_ptrs = E + offs_m.to(tl.int64)[:, None] * stride_e + offs_k[None, :]
        c_ptrs = C + offs_n.to(tl.int64)[None, :] * stride_c + offs_k[:, None]
        if EVEN_K:  # D % BLOCK_K == 0: no mask along K, which lets the compiler pipeline the loads freely
            a = tl.load(e_ptrs, mask=offs_m[:, None] < N, other=0.0)
            b = tl.load(c_ptrs, mask=offs_n[None, :] < V, other=0.0)
        else:
            a = tl.load(e_ptrs, mask=(offs_m[:, None] < N) & (offs_k[None, :] < D), other=0.0)
            b = tl.load(c_ptrs, mask=(offs_n[None, :] < V) & (offs_k[:, None] < D), other=0.0)
    return accumulate_dot(a, b, acc, UPCAST, IEEE_FP32)


@triton.jit
def accumulate_dot(a, b, acc, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr):
    """acc + a @ b in fp32 (inlined where it is called): tiles upcast to fp32 in the interpreter (its
    half-precision dot is unreliable), IEEE products for fp32 inputs unless TF32 was opted into
    (``precision.py``)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def accurate_tanh(x):
    """tanh(x) to ~2e-7 relative error for every fp32 x, from FMAs and one exp only.

    Why not 1 - 2 / (exp(2x) + 1) alone: near 0 it cancels, with relative error ~1e-7 / |x| (softcap's
    argument x = logit / cap is small for a large cap: 1e-4 relative error at cap 1e4). Why not
    ``libdevice.tanh``: the interpreter has no libdevice, and the GPU tests must run the code the CPU tests run.
    So for |x| < 0.625 it is x + x^3 P(x^2), P a degree-4 minimax fit of (tanh(x) - x) / x^3 on that interval
    (max relative error 7.9e-8 in fp32, measured on 4e5 points); above, the exp form on |x| (cancellation at
    most 2x there: max 1.6e-7), which saturates to exactly 1 when exp overflows, with the sign restored.
    Both branches are computed (no divergence within a tile): ~8 FMAs more per logit than the exp form."""
    s = x * x
    p = -5.70498872745e-3 * s + 2.06390887954e-2
    p = p * s - 5.37397155531e-2
    p = p * s + 1.33314422036e-1
    p = p * s - 3.33332819422e-1
    small = x + x * (s * p)
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def finish_logits(acc, BIAS, offs_n, V, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Bias, then softcap: the logits z from the raw products e . c."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < V, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:  # softcap * tanh(x / softcap), accurate for every cap
        acc = softcap * accurate_tanh(acc / softcap)
    return acc


@triton.jit
def logit_tile(
    E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE_FP32: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 tile ``softcap(E[m0:m0+BLOCK_M] @ C[n0:n0+BLOCK_N].T + bias)`` of shape (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        acc = dot_step(E, C, acc, m0, n0, k0, N, V, D, stride_e, stride_c,
                       UPCAST, IEEE_FP32, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    return finish_logits(acc, BIAS, n0 + tl.arange(0, BLOCK_N), V, softcap, HAS_BIAS, HAS_SOFTCAP)
