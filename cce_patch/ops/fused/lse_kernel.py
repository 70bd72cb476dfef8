"""Forward kernel: per-row log-sum-exp, target logit and logit sum, without storing any logit.

Math, for rows i of a BLOCK_M block and the vocabulary slice [v_lo, v_hi) of one work item:
    z_ij   = softcap(e_i . c_j + b_j)                 (fp32, one BLOCK_M x BLOCK_N tile at a time)
    m_i    = max_j z_ij,  s_i = sum_j exp(z_ij - m_i) (online: rescaled as m_i grows)
    zt_i   = z_{i, t_i}                               (stored by the one slice that holds t_i)
    zsum_i = sum_j z_ij                               (only for label smoothing)
Reads e (N x D) and c (V x D) once per tile pass (from L2 after the first); writes (m, s[, zsum]) per row
per vocabulary split plus zt per row. The launcher sizes the splits so that the grid holds a fixed number of
waves, so that partial memory is ~8 B x BLOCK_M x programs (~4 MB on an H100) whatever N and V are.
The splits are combined in ``combine_partials``.

Per-token statistics (``linear_log_probs``; the math is in ``ops/stats.py``): behind compile-time flags that
are all off on the loss path (which therefore compiles to the same kernel), each split also keeps, against
its running max m_i, x_i = sum_j exp(z_ij - m_i) (z_ij - m_i) (entropy), sq_i = sum_j exp(2 (z_ij - m_i))
(log sum p^2) and mbt_i = max_{j < t_i} z_ij (is the target the first argmax?), and zsum_i (mean logit).
HAS_SCALE multiplies the fp32 products by one factor alpha before the bias is added (the launcher passes the
bias pre-multiplied by alpha), i.e. z = softcap(alpha (e . c + b)): the temperature and the model's logit scale.
``combine_stats`` merges the splits.

Speed mode (STORE_Q) additionally writes, for every logit of the rows, the unnormalised probability
    q_ij = exp(z_ij - anchor_i) * (1 - (z_ij / softcap)^2)      (softcap factor only with softcap; 0 at j = t_i)
in the input dtype, where anchor_i is a per-row exponent anchor fixed before the launch (``speed_mode.py``: the
target logit plus a margin; +inf for ignored rows, whose q rows are therefore exactly 0). Because anchor_i does
not move while the kernel streams the vocabulary, the sum of exp needs no running max either: each split
reports (anchor_i, sum_{j != t_i} exp(z_ij - anchor_i)), merged by ``speed_mode.combine_speed_partials``, and
every exp is computed once, for both the sum and q. After the launch the whole row of q is the logit gradient
up to the row scale exp(anchor_i - lse_i), and cuBLAS consumes it directly. The q tile goes out through the copy
engine when the loads do (an asynchronous store that overlaps the next tile's matmul); q (rows x V) is this
mode's memory cost.

Grid: 1-D over work items (row block, vocabulary split). Items are ordered in groups of GROUP_M row blocks,
rows fastest inside a group: programs running together share one c tile across GROUP_M row blocks, and the
group's rows of e (GROUP_M x BLOCK_M x D) stay resident in L2 while the group walks the vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import LossSpec
from ..stats import StatsSpec
from . import tiles
from .jit_common import dot_step, finish_logits, grouped_pid, logit_tile, row_targets

#: Forward work items to aim for, in waves of one program per SM (a 128x256 fp32 accumulator fills an SM).
#: Many short items keep the last wave's idle tail small (the first design gave each program 1/9 of the
#: vocabulary: 576 items = 4.4 waves on 132 SMs, a fifth wave 36% full), while the per-split partials stay at
#: ~8 B x BLOCK_M x items whatever N is (~4 MB at BLOCK_M=128).
FWD_WAVES = 32
#: With TMA, run the forward as one flat loop over (vocab tile, K step) so that the next tile's loads stay in
#: flight across the epilogue: 14.4 -> 13.9 ms. With pointer loads it is slower (16.8 -> 19.1), so it is off there.
FWD_FLAT_LOOP = True
#: Speed mode writes q through the copy engine (an asynchronous bulk store from shared memory) instead of
#: pointer stores from registers. H100, paper shape: speed fwd+bwd 48.2 -> 46.3 ms (lm), 51.0 -> 48.7 (peaked).
#: The same store for memory mode's dS (3 pipeline stages, to fit the 64 KB staging tile) was slower:
#: 57.0 -> 60.9 ms (lm), 62.3 -> 63.6 (peaked), so dS keeps pointer stores (KERNEL_NOTES.md, v5).
Q_TMA_STORE = True
#: Gradient filtering: the tile masses are the sums of the q values as stored (rounded to q's dtype, with the
#: softcap derivative) when True, or the fp32 sums the kernel forms anyway for the LSE (one reduction less per
#: tile) when False; those bound the stored values' sums within q's rounding, which the decision then adds
#: (``tile_mass_margin``). False: interleaved A/B on an H100 at the paper shape (two rounds each, fwd+bwd ms,
#: benchmarks/ab_tile_mass_source_h100.json): lm 41.1 -> 37.8 (natural order) and 37.3 -> 35.6 (mean-logit
#: order), flat 49.1 -> 48.6 and 50.9 -> 50.1; the exact path does not write masses and is unchanged.
MASS_FROM_STORED = False


def tile_mass_margin(dtype: torch.dtype) -> float:
    """The factor the decision multiplies the kernel's tile masses by so that they bound the masses of the q the
    gradient GEMMs read: 1 for sums of the stored values, else 1 + the unit roundoff of q's dtype (the stored
    q_ij rounds the fp32 one to nearest, |error| <= u |q_ij|; the softcap factor only shrinks q)."""
    return 1.0 if MASS_FROM_STORED else 1.0 + torch.finfo(dtype).eps / 2


@triton.jit
def anchored_update(z, offs_n, tgt, V, anchor, s_i, zt_i, zsum_i, NEED_ZSUM: tl.constexpr):
    """Speed mode's version of ``online_update``: with the anchor fixed per row, fold one logit tile
    into (sum over non-target columns of exp(z - anchor), target logit, logit sum) and return the tile's
    q = exp(z - anchor), 0 at the target column, for the store, and its row sums (the tile masses' fp32 source).

    Leaving the target out of the sum lets the host form p_t - 1 = -s / (s + exp(z_t - anchor)) without the
    cancellation of computing p_t first. bf16 and fp32 share fp32's exponent range, so q keeps full relative
    precision for logits down to ~87 nats below anchor and overflows only ~88 above it; the launcher places
    anchor and checks each row afterwards (``speed_mode.SPEED_RANGE``)."""
    col_ok = offs_n[None, :] < V
    is_target = offs_n[None, :] == tgt[:, None]
    if NEED_ZSUM:
        zsum_i += tl.sum(tl.where(col_ok, z, 0.0), axis=1)
    zt_i += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    q = tl.where(col_ok & ~is_target, tl.exp(z - anchor[:, None]), 0.0)
    q_sum = tl.sum(q, axis=1)
    s_i += q_sum
    return q, q_sum, s_i, zt_i, zsum_i


@triton.jit
def store_q_tile(Q, stride_q, q, z, offs_m, offs_n, m0, n0, row_ok, V, softcap,
                 HAS_SOFTCAP: tl.constexpr, Q_IS_DESC: tl.constexpr):
    """Write one tile of q with the softcap derivative applied (the target column is already 0: its gradient
    entry is formed in fp32 on the host), and return the values written (in q's dtype), which the tile-mass
    output sums (``store_tile_mass``)."""
    if HAS_SOFTCAP:
        zc = z / softcap
        q = q * (1.0 - zc * zc)
    if Q_IS_DESC:
        stored = q.to(Q.dtype)
        Q.store([m0, n0], stored)
    else:
        stored = q.to(Q.dtype.element_ty)
        ptrs = Q + offs_m.to(tl.int64)[:, None] * stride_q + offs_n[None, :]
        tl.store(ptrs, stored, mask=row_ok[:, None] & (offs_n[None, :] < V))
    return stored


@triton.jit
def store_tile_mass(MASS, stride_mass, stored, q_sum, offs_m, n0, row_ok, BLOCK_N: tl.constexpr,
                    MASS_FROM_STORED: tl.constexpr):
    """Gradient filtering (``ops/filtering.py``): MASS[i, n0 // BLOCK_N] = the tile's mass of row i, in fp32:
    the sum of the q_ij just stored (``MASS_FROM_STORED``: exactly the gradient operand's, the padding columns
    past V hold q = 0), or ``q_sum``, the fp32 row sums of the tile before rounding and softcap (already formed
    for the LSE; ``tile_mass_margin`` turns them into a bound of the stored ones).
    One plain store per (row, tile): each tile of a row belongs to exactly one program, no atomics."""
    if MASS_FROM_STORED:
        mass = tl.sum(stored.to(tl.float32), axis=1)
    else:
        mass = q_sum
    tl.store(MASS + offs_m.to(tl.int64) * stride_mass + n0 // BLOCK_N, mass, mask=row_ok)


@triton.jit
def online_update(z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i, NEED_ZSUM: tl.constexpr):
    """Fold one logit tile into the running (max, sum of exp, target logit, logit sum) of each row."""
    col_ok = offs_n[None, :] < V
    if NEED_ZSUM:
        zsum_i += tl.sum(tl.where(col_ok, z, 0.0), axis=1)
    zt_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
    z = tl.where(col_ok, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    tile_s = tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    s_i = s_i * tl.exp(m_i - m_new) + tile_s
    return m_new, s_i, zt_i, zsum_i, tile_s


@triton.jit
def store_tile_log_mass(MASS, stride_mass, m_new, tile_s, offs_m, n0, row_ok, BLOCK_N: tl.constexpr):
    """Gradient filtering in memory mode (``memory_filter.py``): MASS[i, n0 // BLOCK_N] = log of row i's sum of
    exp(z_ij) over the tile, as m_i + log(sum_j exp(z_ij - m_i)) with m_i the running max after the tile. The
    LSE is not known yet (the max still moves), so the mass exp(that - lse_i) is formed after the launch; one
    log per row and tile, on sums the kernel forms for the LSE anyway. A tile whose exps all underflow gets
    -inf (mass 0: each of its entries is below e^-87 of the row's max, far inside the decision's margin)."""
    tl.store(MASS + offs_m.to(tl.int64) * stride_mass + n0 // BLOCK_N, m_new + tl.log(tile_s), mask=row_ok)


@triton.jit
def stats_update(z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i,
                 NEED_ZSUM: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SQ: tl.constexpr, NEED_TOP1: tl.constexpr):
    """``online_update`` plus the per-token statistics' sums, all against the running max m (``ops/stats.py``):
    x = sum exp(z - m) (z - m), sq = sum exp(2 (z - m)), mbt = max of z left of the target column.

    Keeping x relative to m (not sum exp(z - m) z) avoids the cancellation of lse - E[z] when the logits are
    large and the entropy small; when m grows by d, x -> exp(-d) (x - d s) and sq -> exp(-2d) sq."""
    col_ok = offs_n[None, :] < V
    if NEED_ZSUM:
        zsum_i += tl.sum(tl.where(col_ok, z, 0.0), axis=1)
    zt_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
    if NEED_TOP1:
        left = col_ok & (offs_n[None, :] < tgt[:, None])
        mbt_i = tl.maximum(mbt_i, tl.max(tl.where(left, z, float("-inf")), axis=1))
    zm = tl.where(col_ok, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(zm, axis=1))
    rescale = tl.exp(m_i - m_new)
    p = tl.exp(zm - m_new[:, None])
    if NEED_ENTROPY:
        shift = tl.where(s_i > 0, m_i - m_new, 0.0) * s_i  # the first tile: m_i = -inf and s_i = 0
        x_i = rescale * (x_i + shift) + tl.sum(p * tl.where(col_ok, z - m_new[:, None], 0.0), axis=1)
    if NEED_SQ:
        sq_i = sq_i * rescale * rescale + tl.sum(p * p, axis=1)
    s_i = s_i * rescale + tl.sum(p, axis=1)
    return m_new, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i


@triton.jit
def scaled_logit_tile(
    E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``jit_common.logit_tile``, with the fp32 products multiplied by ``logit_scale`` before the (pre-scaled)
    bias and the soft cap when HAS_SCALE; exactly ``logit_tile`` otherwise."""
    if HAS_SCALE:
        raw = logit_tile(E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap,
                         False, False, UPCAST, IEEE_FP32, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
        z = finish_logits(raw * logit_scale, BIAS, n0 + tl.arange(0, BLOCK_N), V, softcap, HAS_BIAS, HAS_SOFTCAP)
    else:
        z = logit_tile(E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap,
                       HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_FP32, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    return z


@triton.jit
def lse_forward_kernel(
    E, C, BIAS, T, PART, ZT,  # PART: (planes, splits, N) fp32 -> m, s[, zsum[, x, sq, mbt]]; ZT: (N,) fp32, zero-filled
    Q, ANCHOR, stride_q,  # speed mode only (STORE_Q): Q (N, V) in the input dtype (descriptor or pointer), ANCHOR (N,)
    N, V, D, stride_e, stride_c, shift_period, ignore_index, softcap, tiles_per_split, n_splits, GROUP_M,
    logit_scale,  # per-token statistics only (HAS_SCALE): the fp32 factor alpha of ops/stats.py
    MASS, stride_mass,  # gradient filtering only (STORE_MASS): (N, cdiv(V, BLOCK_N)) fp32 tile sums of q, or
    # without STORE_Q (memory mode) the tiles' log sums of exp(z) (``store_tile_log_mass``)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_ZSUM: tl.constexpr, STORE_Q: tl.constexpr,
    Q_IS_DESC: tl.constexpr, UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, FLAT_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STATS: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SQ: tl.constexpr, NEED_TOP1: tl.constexpr,
    HAS_SCALE: tl.constexpr, STORE_MASS: tl.constexpr, MASS_FROM_STORED: tl.constexpr,
):
    pid_m, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tgt, valid = row_targets(T, offs_m, N, shift_period, ignore_index)
    out = PART + pid_s.to(tl.int64) * N + offs_m
    plane = tl.cast(n_splits, tl.int64) * N  # tl.cast: n_splits == 1 arrives as a Python int (specialised)
    row_ok = offs_m < N
    v_lo = pid_s * tiles_per_split * BLOCK_N
    v_hi = tl.minimum(v_lo + tiles_per_split * BLOCK_N, V)
    # A block whose rows are all ignored (prompt tokens, padding) does no matmul work at all.
    valid_in_block = tl.sum(valid.to(tl.int32), axis=0)
    any_valid = valid_in_block > 0
    n_tiles = tl.where(any_valid, tl.cdiv(v_hi - v_lo, BLOCK_N), 0)
    if STORE_Q:
        anchor = tl.load(ANCHOR + offs_m, mask=row_ok, other=float("inf"))
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zsum_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if STATS:
        x_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sq_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mbt_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    m0 = pid_m * BLOCK_M
    if FLAT_LOOP:
        # One loop over (tile, K step) pairs with the epilogue on each tile's last step: the software
        # pipeliner then keeps the next tile's loads in flight across the epilogue and the tile boundary.
        k_steps = tl.cdiv(D, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, n_tiles * k_steps):
            tile = it // k_steps
            ki = it - tile * k_steps
            n0 = v_lo + tile * BLOCK_N
            acc = dot_step(E, C, acc, m0, n0, ki * BLOCK_K, N, V, D, stride_e, stride_c,
                           UPCAST, IEEE_FP32, EVEN_K, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
            if ki == k_steps - 1:
                offs_n = n0 + tl.arange(0, BLOCK_N)
                if HAS_SCALE:
                    acc = acc * logit_scale
                z = finish_logits(acc, BIAS, offs_n, V, softcap, HAS_BIAS, HAS_SOFTCAP)
                if STORE_Q:
                    q, q_sum, s_i, zt_i, zsum_i = anchored_update(z, offs_n, tgt, V, anchor, s_i, zt_i, zsum_i,
                                                                     NEED_ZSUM)
                    stored = store_q_tile(Q, stride_q, q, z, offs_m, offs_n, m0, n0, row_ok, V, softcap,
                                          HAS_SOFTCAP, Q_IS_DESC)
                    if STORE_MASS:
                        store_tile_mass(MASS, stride_mass, stored, q_sum, offs_m, n0, row_ok, BLOCK_N,
                                        MASS_FROM_STORED)
                elif STATS:
                    m_i, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i = stats_update(
                        z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i,
                        NEED_ZSUM, NEED_ENTROPY, NEED_SQ, NEED_TOP1)
                else:
                    m_i, s_i, zt_i, zsum_i, tile_s = online_update(z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i,
                                                                   NEED_ZSUM)
                    if STORE_MASS:
                        store_tile_log_mass(MASS, stride_mass, m_i, tile_s, offs_m, n0, row_ok, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        for tile in range(0, n_tiles):
            n0 = v_lo + tile * BLOCK_N
            z = scaled_logit_tile(E, C, BIAS, m0, n0, N, V, D, stride_e, stride_c, softcap, logit_scale,
                                  HAS_BIAS, HAS_SOFTCAP, HAS_SCALE, UPCAST, IEEE_FP32, EVEN_K, USE_TMA,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if STORE_Q:
                q, q_sum, s_i, zt_i, zsum_i = anchored_update(z, offs_n, tgt, V, anchor, s_i, zt_i, zsum_i,
                                                                 NEED_ZSUM)
                stored = store_q_tile(Q, stride_q, q, z, offs_m, offs_n, m0, n0, row_ok, V, softcap,
                                      HAS_SOFTCAP, Q_IS_DESC)
                if STORE_MASS:
                    store_tile_mass(MASS, stride_mass, stored, q_sum, offs_m, n0, row_ok, BLOCK_N,
                                    MASS_FROM_STORED)
            elif STATS:
                m_i, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i = stats_update(
                    z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i, x_i, sq_i, mbt_i,
                    NEED_ZSUM, NEED_ENTROPY, NEED_SQ, NEED_TOP1)
            else:
                m_i, s_i, zt_i, zsum_i, tile_s = online_update(z, offs_n, tgt, V, m_i, s_i, zt_i, zsum_i, NEED_ZSUM)
                if STORE_MASS:
                    store_tile_log_mass(MASS, stride_mass, m_i, tile_s, offs_m, n0, row_ok, BLOCK_N)
    if STORE_Q:
        m_i = anchor  # s_i is relative to the fixed anchor
        if valid_in_block == 0:
            # The matmul was skipped, but the gradient GEMMs read these rows of q: they must be zeros.
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for tile in range(0, tl.cdiv(v_hi - v_lo, BLOCK_N)):
                n0 = v_lo + tile * BLOCK_N
                stored = store_q_tile(Q, stride_q, zero, zero, offs_m, n0 + tl.arange(0, BLOCK_N), m0, n0,
                                      row_ok, V, softcap, False, Q_IS_DESC)
                if STORE_MASS:
                    no_mass = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    store_tile_mass(MASS, stride_mass, stored, no_mass, offs_m, n0, row_ok, BLOCK_N,
                                    MASS_FROM_STORED)
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + plane, s_i, mask=row_ok)
    if NEED_ZSUM:
        tl.store(out + 2 * plane, zsum_i, mask=row_ok)
    if STATS:
        if NEED_ENTROPY:
            tl.store(out + 3 * plane, x_i, mask=row_ok)
        if NEED_SQ:
            tl.store(out + 4 * plane, sq_i, mask=row_ok)
        if NEED_TOP1:
            tl.store(out + 5 * plane, mbt_i, mask=row_ok)
    # Exactly one split holds each valid row's target: a plain masked store, no atomics, no per-split plane.
    owns_target = valid & (tgt >= v_lo) & (tgt < v_hi)
    tl.store(ZT + offs_m, zt_i, mask=owns_target)


def combine_partials(part: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor, label_smoothing: float, vocab: int):
    """Merge per-split (m, s[, zsum]) and the target logits into per-row (loss, lse); ignored rows get 0."""
    m, s = part[0], part[1]  # each (splits, N)
    m_max = m.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    lse = m_safe + torch.log((s * torch.exp(m - m_safe)).sum(dim=0))
    loss = lse - (1.0 - label_smoothing) * zt
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * part[2].sum(dim=0)
    zero = torch.zeros_like(lse)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


#: Planes of the forward's partials: m and s always, zsum with label smoothing or the mean logit, the rest
#: for the per-token statistics (``stats_update``).
PLANE_ZSUM, PLANE_X, PLANE_SQ, PLANE_MBT = 2, 3, 4, 5


def combine_stats(part: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor, stats: StatsSpec, vocab: int):
    """Merge the per-split partials of a statistics launch into per-row (log_probs, lse, entropy,
    log_sum_sq_probs, mean_logits, is_top1), fp32 (bool for is_top1), 0 / False on ignored rows; the fields
    ``stats`` does not ask for are None.

    With M the max over splits k and w_k = exp(m_k - M): S = sum_k w_k s_k, lse = M + log S,
    entropy = log S - sum_k w_k (x_k + (m_k - M) s_k) / S, log sum p^2 = log(sum_k w_k^2 sq_k) - 2 log S,
    and the target is the first argmax iff z_t >= M and z_t > max_k mbt_k."""
    m, s = part[0], part[1]
    m_max = m.max(dim=0).values
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    w = torch.exp(m - m_safe)
    s_tot = (s * w).sum(dim=0)
    log_s = torch.log(s_tot)
    lse = m_safe + log_s
    zero = torch.zeros_like(lse)

    def keep(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, zero)

    entropy = log_sum_sq = mean = top1 = None
    if stats.entropy:
        x = part[PLANE_X] + torch.where(s > 0, (m - m_safe) * s, 0.0)  # splits relative to their own max -> to M
        entropy = keep(log_s - (w * x).sum(dim=0) / s_tot)
    if stats.log_sum_sq_probs:
        log_sum_sq = keep(torch.log((part[PLANE_SQ] * w * w).sum(dim=0)) - 2.0 * log_s)
    if stats.mean_logits:
        mean = keep(part[PLANE_ZSUM].sum(dim=0) / vocab)
    if stats.is_top1:
        top1 = valid & (zt >= m_max) & (zt > part[PLANE_MBT].max(dim=0).values)
    return keep(zt - lse), keep(lse), entropy, log_sum_sq, mean, top1


def launch_lse_forward(e2d, c, bias, targets_flat, spec: LossSpec, q: torch.Tensor | None = None,
                       anchor: torch.Tensor | None = None,
                       stats: StatsSpec | None = None,
                       mass: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: per-split partials (m, s[, zsum]) and the target logits zt.

    With ``q`` and ``anchor`` (speed mode), the kernel also writes q = exp(z - anchor) for every logit into ``q``
    (rows x V view, unit column stride). With ``stats`` (per-token statistics, never with ``q``), the logits are
    ``softcap(stats.logit_scale * (e . c + b))`` and the partials hold the planes ``combine_stats`` reads. With
    ``mass`` (gradient filtering; never with ``stats``): (rows, cdiv(V, block_n)) fp32 of the launch's tile
    config, filled with each row's mass of q over each BLOCK_N-wide column tile with ``q`` (``store_tile_mass``;
    times ``tile_mass_margin`` a bound of the stored q's), or without ``q`` (memory mode) with each row's log sum
    of exp(z) over the tile (``store_tile_log_mass``; rows of blocks without a counted row are not written)."""
    n, d = e2d.shape
    v = c.shape[0]
    cfg = tiles.tile_config(e2d.dtype, "forward" if q is None else "store")
    row_blocks = triton.cdiv(n, cfg.block_m)
    vocab_tiles = triton.cdiv(v, cfg.block_n)
    splits = max(1, min(vocab_tiles, triton.cdiv(FWD_WAVES * tiles.num_sms(e2d.device), row_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split starts inside the vocabulary
    stats = stats or StatsSpec()
    need_zsum = spec.label_smoothing > 0 or stats.mean_logits
    extras = stats.entropy or stats.log_sum_sq_probs or stats.is_top1
    planes = PLANE_MBT + 1 if extras else (PLANE_ZSUM + 1 if need_zsum else 2)
    part = torch.empty((planes, splits, n), dtype=torch.float32, device=e2d.device)
    bias_arg = bias if bias is not None else e2d
    if bias is not None and stats.scaled:  # z = softcap(alpha * acc + alpha * b): the kernel adds a scaled bias
        bias_arg = bias.float() * stats.logit_scale
    zt = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    e_arg, c_arg, use_tma = tiles.matmul_operands(e2d, c, cfg)
    store_q = q is not None
    q_arg = q if store_q else e2d
    if store_q and use_tma and Q_TMA_STORE and tiles.tma_ok(q):  # asynchronous bulk store of each q tile
        q_arg = tiles.TensorDescriptor.from_tensor(q, [cfg.block_m, cfg.block_n])
    lse_forward_kernel[(row_blocks * splits,)](
        e_arg, c_arg, bias_arg, targets_flat, part, zt,
        q_arg, anchor if store_q else zt, q.stride(0) if store_q else 0,
        n, v, d, e2d.stride(0), c.stride(0), spec.shift_period, spec.ignore_index,
        float(spec.softcap or 1.0), tiles_per_split, splits, cfg.group_m, stats.logit_scale,
        mass if mass is not None else zt, mass.stride(0) if mass is not None else 0,
        NEED_ZSUM=need_zsum, STORE_Q=store_q, Q_IS_DESC=store_q and q_arg is not q,
        USE_TMA=use_tma, FLAT_LOOP=FWD_FLAT_LOOP and use_tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tiles.kernel_flags(e2d, bias, spec, cfg),
        STATS=extras, NEED_ENTROPY=stats.entropy, NEED_SQ=stats.log_sum_sq_probs, NEED_TOP1=stats.is_top1,
        HAS_SCALE=stats.scaled, STORE_MASS=mass is not None, MASS_FROM_STORED=MASS_FROM_STORED,
    )
    return part, zt
