"""Speed mode on the Triton backend: exact gradients formed during the forward pass, nothing recomputed.

When the loss is a scalar (mean or sum), the upstream gradient of every row is known up to one scalar
before the backward pass: w_i = 1/n_valid (mean) or 1 (sum), times the final grad_output. So the gradient
can be formed while the logits are being computed, and the backward's recompute of the logits (a fourth
GEMM of N x D x V) disappears. Per chunk of token rows (sized by a byte budget), with z = softcap(e c^T + b):

    1. anchor_i = z_{i,t_i} + ANCHOR_MARGIN, from the target logit (a gather-dot, ``row_prep_kernel.py``), where
       z_{i,t_i} is a lower bound of the row max: max_j z_ij - z_{i,t_i} <= lse_i - z_{i,t_i} = the row's loss.
    2. The forward kernel streams the vocabulary as usual and also stores q_ij = exp(z_ij - anchor_i)
       [* softcap derivative], 0 at the target, in the input dtype. Its anchor does not move while the
       kernel runs, so one scalar per row turns q into probabilities: p_ij = q_ij * a_i,
       a_i = exp(anchor_i - lse_i).
    3. cuBLAS, with w the loss weight of a counted row (1/n_valid for mean, 1 for sum):
           dE[rows] = w a * (Q @ C) + w (p_t - (1 - eps)) f_t * c_t     (fp32, rounded once)
           dC      += w * Q^T @ (a * E[rows])                            (input dtype, in place)
       and at the end, per distinct target v, dC[v] += w * sum_{i: t_i = v} (p_t - (1 - eps)) f_t e_i, summed
       in fp32 and rounded once. The target entries stay out of q because p_t - 1 must be formed before any
       rounding and because, summed over the few rows that share a target, their rounding does not average
       out the way the dense p part's does. Label smoothing adds rank-one terms; bias adds Q^T a.

Three GEMMs in all (the 3-GEMM floor). Memory: the q chunk (rows x V in the input dtype) on top of the
gradients, plus fp32 rows x D temporaries.

Range: bf16 and fp32 hold exp(x) for x in about [-87, 88]. With the margin, q_max = exp(max_j z - anchor)
<= exp(loss - 40), and every logit within 40 nats of the max has q >= e^-80: full relative precision. The
launcher checks lse_i - anchor_i <= SPEED_RANGE (64) per row, i.e. losses up to 104 nats (p_target > 1e-45);
beyond that, or on any non-finite value, the call falls back to the recompute path (see ``ops/speed_mode.py``).
fp16's range (~[-10, 11] in exp) is far too narrow for this, so speed mode refuses fp16 inputs.

Gradient filtering (``filter_eps``, ``ops/filtering.py``): the storing kernel also writes, per row and column
tile, the fp32 sum of the q it formed (a bound of the stored q's with the rounding margin); after a chunk's
combine step ``filter_plan.decide_chunk`` sorts the chunk's rows
by confidence, decides per (block of 128 sorted rows, 256-entry tile) on the GPU, and the two products above run
over the kept pairs only (``sparse_grads.py``), or, where more than ``DENSE_KEPT_FRACTION`` of the pairs are
kept, as the dense GEMMs on the whole of q: that chunk's gradients are the exact ones (within any bound), and
the counter says nothing was skipped there. Zeroing the skipped tiles of q first would make the dense products
no faster, only less exact, at the price of a pass over q (6.25 ms a call at the paper shape, H100). dbias is
one column sum of q, exact on either path for the same reason. The choice between the two (and the dE kernel's
split) reads the number of kept pairs and the largest count of a block: the previous call's of the same chunk
from the second call of a shape, so that the host does not wait for the chunk's storing kernel
(``filter_plan.chunk_counts``); either choice keeps the bound. Where the last deciding call of a shape ran every
chunk dense, the next calls run as the exact call, but every ``filter_plan.PROBE_EVERY``-th
(``filter_plan.skip_filter_work``): where nothing is worth skipping, the filter then costs nothing.
"""

from __future__ import annotations

import torch
import triton

from ..filtering import BM, BV, GradFilter
from ..spec import LossSpec, loss_weight
from ..speed_plan import MAX_ROUNDED_DC_CHUNKS, SpeedPlan, plan_triton
from . import tiles
from .filter_plan import bypass_if_dense, chunk_counts, chunk_key, decide_chunk
from .gemm import mm_accumulate, mm_fp32
from .lse_kernel import launch_lse_forward, tile_mass_margin
from .row_prep_kernel import prepare_rows
from .sparse_grads import de_splits, sparse_dc_accumulate, sparse_de

#: Added to the target logit to place each row's exponent anchor. Since the target logit is at most the row max,
#: anchor <= max + 40, so every logit that matters (within 40 nats of the max) has q >= e^-80, a normal bf16/fp32
#: number.
ANCHOR_MARGIN = 40.0
#: Largest lse - anchor a row may have: q then stays below e^64 (bf16/fp32 overflow at e^88.7) and the row
#: scale a = exp(anchor - lse) above e^-64. Together with the margin: losses up to 104 nats.
SPEED_RANGE = 64.0
#: Gradient filtering: a chunk whose kept (row block, tile) pairs are at most this fraction of all runs the
#: block-sparse kernels; above it, the dense cuBLAS GEMMs on all of q, exact (the pointer-load sparse kernels
#: run below cuBLAS's rate per kept pair, so they pay only where most pairs are skipped).
DENSE_KEPT_FRACTION = 0.5


def new_q_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised q storage: the kernel writes every element the GEMMs read (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def combine_speed_partials(part: torch.Tensor, zt: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor,
                           eps: float, vocab: int):
    """(loss, lse, a, p_t - 1) per row from the storing kernel's per-split sums s = sum_{j != t} exp(z_j - anchor).

    With q_t = exp(z_t - anchor) and S = s + q_t: lse = anchor + log S, a = exp(anchor - lse) = 1 / S, and
    p_t - 1 = -s / S and loss = log1p(s / q_t) have no cancellation, however close p_t is to 1 (lse - z_t in
    fp32 would lose ~ulp(lse), 3e-5 at lse ~ 300)."""
    s_nt = part[1].sum(dim=0)
    q_t = torch.exp(zt - anchor)
    total = s_nt + q_t
    lse = anchor + torch.log(total)
    loss = torch.log1p(s_nt / q_t)
    if eps:
        loss = loss + eps * (zt - part[2].sum(dim=0) / vocab)
    zero = torch.zeros_like(lse)
    return (torch.where(valid, loss, zero), torch.where(valid, lse, zero), torch.where(valid, 1.0 / total, zero),
            torch.where(valid, eps - s_nt / total, zero), torch.where(valid, lse - anchor, zero))


def forward_with_grads(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    mean: bool,
    needs: tuple[bool, bool, bool],
    chunk_rows: int,
    grad_filter: GradFilter | None = None,
):
    """(loss_rows, lse_rows, dE, dC, dbias, in_range, weight) for the scalar loss ``weight * sum of counted
    rows``, ``weight`` a 0-dim fp32 tensor: 1/n_valid (``mean``) or 1.

    With ``grad_filter`` (``ops/filtering.py``) the gradients are filtered: the storing kernel also writes each
    row's tile sums of q, each chunk's decision is formed on the GPU (``filter_plan.py``), and the chunk's
    products run block-sparse (``sparse_grads.py``) or, where most pairs are kept, dense and exact on all of q
    (``DENSE_KEPT_FRACTION``); the loss and LSE are the exact ones either way.

    ``in_range`` is a 0-dim bool tensor (not synced here): False when some row is outside SPEED_RANGE (or
    not finite), in which case neither the gradients nor loss/lse are to be used.

    Launch order matters here: the caller's target check leaves the GPU idle, and every small torch op
    before the first storing launch costs host time while it stays idle. So the row anchors come from
    one kernel and the first storing kernel is launched before any other bookkeeping."""
    need_de, need_dc, need_db = needs
    n, d = e2d.shape
    v = c.shape[0]
    dtype = e2d.dtype
    eps, cap = spec.label_smoothing, spec.softcap
    tgt, anchor_all = prepare_rows(e2d, c, bias, targets_flat, spec, ANCHOR_MARGIN)
    chunk_spec = LossSpec(ignore_index=spec.ignore_index, softcap=cap, label_smoothing=eps, shift_period=0)
    v_pad = triton.cdiv(v, 8) * 8  # 16-byte aligned rows of q for the copy engine and cuBLAS
    q = new_q_buffer((min(chunk_rows, n), v_pad), dtype, e2d.device)[:, :v]
    chunks = row_chunks(n, chunk_rows)

    mass = None
    if grad_filter is not None:
        mass_cols = triton.cdiv(v, tiles.tile_config(dtype, "store").block_n)
        mass = torch.empty((min(chunk_rows, n), mass_cols), dtype=torch.float32, device=e2d.device)

    def launch(r0: int, r1: int):
        return launch_lse_forward(e2d[r0:r1], c, bias, tgt[r0:r1], chunk_spec, q=q[: r1 - r0], anchor=anchor_all[r0:r1],
                                  mass=mass[: r1 - r0] if mass is not None else None)

    first = launch(*chunks[0])
    # Everything below overlaps the first storing kernel.
    valid = tgt != spec.ignore_index
    t_safe_all = torch.where(valid, tgt, 0)
    weight = loss_weight(valid, mean)
    loss = torch.empty(n, dtype=torch.float32, device=e2d.device)
    lse = torch.empty(n, dtype=torch.float32, device=e2d.device)
    target_coef = torch.empty(n, dtype=torch.float32, device=e2d.device)  # (p_t - (1 - eps)) f_t per row
    gaps = []
    de = torch.empty_like(e2d) if need_de else None
    # dC is accumulated in a buffer with one spare row at the end, where _add_target_rows parks its unused
    # slots (so that it needs no host sync); the gradient returned is a view of the first V rows.
    dc_acc = dc = None
    if need_dc:
        rounded = len(chunks) <= MAX_ROUNDED_DC_CHUNKS or dtype == torch.float32
        dc_acc = torch.empty((v + 1, d), dtype=dtype if rounded else torch.float32, device=c.device)
        dc = dc_acc[:v] if rounded else torch.empty_like(c)
    db = torch.zeros(v, dtype=torch.float32, device=e2d.device) if need_db else None
    c_colsum = torch.sum(c, 0, dtype=torch.float32) if (eps and need_de) else None
    for k, (r0, r1) in enumerate(chunks):
        part, zt = first if k == 0 else launch(r0, r1)
        e_c, ok_c, t_safe, qk = e2d[r0:r1], valid[r0:r1], t_safe_all[r0:r1], q[: r1 - r0]
        loss[r0:r1], lse[r0:r1], a, coef, gap = combine_speed_partials(part, zt, anchor_all[r0:r1], ok_c, eps, v)
        gaps.append(gap.max())
        if cap is not None:
            coef = coef * (1.0 - (zt / cap) ** 2)
        target_coef[r0:r1] = coef
        sparse, splits = None, 1  # the chunk's filter plan where its products run block-sparse
        if grad_filter is not None:
            plan = decide_chunk(mass[: r1 - r0], a, t_safe, ok_c, v, tiles.tile_config(dtype, "store").block_n,
                                grad_filter, tile_mass_margin(dtype))
            # The block-sparse kernels win only where most pairs are skipped; elsewhere cuBLAS on all of q is
            # faster, and exact. The counts come from the previous call of this shape (no host sync) or, on the
            # first, from this chunk (filter_plan.chunk_counts).
            kept, most_kept = chunk_counts(plan, chunk_key(r1 - r0, v, grad_filter.eps, k))
            if kept <= DENSE_KEPT_FRACTION * plan.skipped.numel():
                sparse, splits = plan, de_splits(kept, most_kept, plan.blocks)
            plan.count(grad_filter.counter, applied=sparse is not None)  # a dense chunk skips nothing: exact
        if de is not None:  # Q @ C over the kept pairs (all of them without a sparse plan), then the row terms
            qc = mm_fp32(qk, c) if sparse is None else sparse_de(qk, c, sparse, splits)
            prod = qc.mul_((weight * a)[:, None])
            prod.addcmul_((weight * coef)[:, None], c[t_safe].float())
            if eps:
                prod.sub_((weight * eps / v) * ok_c.float()[:, None] * c_colsum)
            de[r0:r1] = prod.to(dtype)
        if dc is not None:
            ae = (e_c.float() * (weight * a)[:, None]).to(dtype)
            if sparse is None:
                mm_accumulate(dc_acc[:v], qk.T, ae, first=k == 0)
            else:
                sparse_dc_accumulate(dc_acc[:v], qk, ae, sparse, first=k == 0)
        if db is not None:  # one column sum of the whole of q: exact, and as cheap as a filtered one
            db += weight * mm_fp32(qk.T, a[:, None].to(dtype)).squeeze(1)
    # NaN propagates through max: a NaN anywhere means out of range
    in_range = (gaps[0] if len(gaps) == 1 else torch.stack(gaps).max()) <= SPEED_RANGE
    q = qk = None  # the final steps need rows x D temporaries, not the 1-2 GB of q
    if dc is not None:  # target rows and smoothing go into the accumulator, before its one rounding
        if eps:
            smooth = (weight * eps / v) * torch.sum(e2d * valid[:, None], 0, dtype=torch.float32)
            dc_acc[:v].sub_(smooth.to(dc_acc.dtype))
        _add_target_rows(dc_acc, e2d, t_safe_all, weight * target_coef)
        if dc.data_ptr() != dc_acc.data_ptr():
            dc.copy_(dc_acc[:v])
            del dc_acc
    if db is not None:
        db.index_add_(0, t_safe_all, weight * target_coef)
        if eps:
            db -= (weight * eps / v) * valid.sum()
        db = db.to(bias.dtype)
    return loss, lse, de, dc, db, in_range, weight


def _add_target_rows(dc_acc: torch.Tensor, e2d: torch.Tensor, t_safe: torch.Tensor, coef: torch.Tensor,
                     rows_per_step: int = 8192) -> None:
    """dc_acc[v] += sum over rows i with target v of coef_i * e_i (coef is 0 on ignored rows), summed in fp32
    per distinct target and added to dc_acc with one rounding. An index_add_ straight into a bf16 buffer would
    round once per row, and a frequent token is the target of hundreds of rows.

    No host sync: rows are grouped by sorting their targets; group k gets slot k, and slots past the number
    of groups point at dc_acc's spare last row, which absorbs their zero updates."""
    n = t_safe.numel()
    spare = dc_acc.shape[0] - 1
    sorted_t, order = torch.sort(t_safe)
    starts = torch.ones_like(sorted_t, dtype=torch.bool)
    starts[1:] = sorted_t[1:] != sorted_t[:-1]
    group_sorted = torch.cumsum(starts, 0) - 1
    group = torch.empty_like(group_sorted).scatter_(0, order, group_sorted)  # slot of each row
    slot_target = torch.full_like(sorted_t, spare).scatter_(0, group_sorted, sorted_t)
    acc = torch.zeros((n, e2d.shape[1]), dtype=torch.float32, device=e2d.device)
    for i in range(0, n, rows_per_step):
        acc.index_add_(0, group[i:i + rows_per_step], coef[i:i + rows_per_step, None] * e2d[i:i + rows_per_step].float())
    for i in range(0, n, rows_per_step):
        rows = slot_target[i:i + rows_per_step]
        dc_acc[rows] = (dc_acc[rows].float() + acc[i:i + rows_per_step]).to(dc_acc.dtype)


def filter_bypass(e2d: torch.Tensor, c: torch.Tensor, grad_filter: GradFilter, chunk_bytes: int | None) -> bool:
    """Whether this filtered call can run as the exact call (``filter_plan.skip_filter_work``: its shape's last
    deciding call ran every chunk dense, and no probe is due); if so, its (row block, tile) pairs are counted as
    seen with none skipped. Asked by the op before it orders the vocabulary, which such a call does not need."""
    n, d = e2d.shape
    v = c.shape[0]
    chunks = row_chunks(n, speed_plan(n, d, v, e2d.dtype, chunk_bytes).rows)
    keys = [chunk_key(r1 - r0, v, grad_filter.eps, k) for k, (r0, r1) in enumerate(chunks)]
    pairs = [triton.cdiv(r1 - r0, BM) * triton.cdiv(v, BV) for r0, r1 in chunks]
    return bypass_if_dense(keys, pairs, DENSE_KEPT_FRACTION, grad_filter.counter, e2d.device)


def row_chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """The (start, end) rows of each chunk of a call: ``rows`` at a time, the last one possibly shorter."""
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def speed_plan(n: int, d: int, v: int, dtype: torch.dtype, chunk_bytes: int | None) -> SpeedPlan:
    """This backend's row chunks for a call (``ops/speed_plan.py``), in whole row blocks of the storing kernel."""
    return plan_triton(n, d, v, dtype, chunk_bytes, tiles.tile_config(dtype, "store").block_m)
