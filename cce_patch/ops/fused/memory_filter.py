"""Gradient filtering in the Triton backend's memory mode: recompute and multiply only the kept pairs.

The rule and its proof are ``ops/filtering.py``'s. What memory mode adds is where the statistics come from and
how the kept work is laid out, since it stores no logits:

1. Forward (``forward``): the fused LSE kernel also writes, per row and column tile, the log of the tile's sum of
   exp(z) (``lse_kernel.store_tile_log_mass``): N x V / BLOCK_N fp32 (33 MB at N = 8192, V = 256,000), kept
   for the backward next to the LSE.
2. Backward (``backward``): the masses m_ik = exp(log_mass_ik - lse_i) (times ``LOG_MASS_MARGIN``) decide the
   kept (row block, tile) pairs with ``filter_plan.decide_chunk`` over all rows (one chunk: rows sorted by
   confidence, blocks of BM rows of that order). If more than ``DENSE_KEPT_FRACTION`` of the pairs are kept, the
   exact backward runs (no faster skipped, so not skipped; counted so). Otherwise e and the per-row inputs
   are gathered into the row order, and the pairs, numbered tile by tile, go through ``pair_grads.py`` in
   batches of whole tiles of at most ``memory_mode.DS_CHUNK_BYTES`` of dS: each batch recomputes its pairs' dS
   tiles, writes its tiles of dC (complete within the batch), and adds its products into an fp32 dE
   accumulator in the row order, which is scattered back at the end.

Label smoothing's uniform term -g_i a / V is added as its rank-one products (dE_i -= (a/V) g_i sum_j c_j,
dC_j -= (a/V) sum_i g_i e_i, dbias_j -= (a/V) sum_i g_i) on every entry, kept or not, as the proof requires;
softcap with smoothing is refused before any work (``filtering.filter_problem``). fp16 is not filtered here
(its dS needs the exact path's scaling); the op refuses or reroutes it (``backends._filtering_impl``).

Rounding of the masses. log_mass is m + log(s) with m the running max (|m| <= 2^8 in practice) and s a sum of
at most BLOCK_N fp32 exps; the backward's p_ij = exp(z_ij - lse_i) recomputes z in the same tile loop. The
estimate exp(log_mass - lse) is then within a relative few * 2^-24 * (|m| + |lse|) + BLOCK_N * 2^-24 of the
mass of the backward's p, below 2^-13 for logits up to 2^8; ``LOG_MASS_MARGIN`` = 1 + 2^-12 covers it, on top of
the rule's own ``BUDGET_FACTOR``.

Cost: one host sync per call (the per-tile pair counts size the batches, the grids and the pair lists), the gather of e (N x D)
and the scatter of dE, and the decision's small ops; where nothing can be skipped the exact backward runs after
the decision, and the shape's next calls run as the exact call (``filter_bypass``: no masses, no decision) but
for a probe every ``filter_plan.PROBE_EVERY`` calls, as speed mode's do.
"""

from __future__ import annotations

import itertools

import torch
import triton

from ..filtering import BM, BV, GradFilter
from ..spec import LossSpec, effective_targets
from . import memory_mode, tiles
from .filter_plan import ChunkFilter, bypass_if_dense, decide_chunk, remember_counts
from .pair_grads import pair_dc, pair_de, pair_logit_grads

#: Factor on the masses from the forward's log sums: bounds the backward's recomputed ones (module docstring).
LOG_MASS_MARGIN = 1.0 + 2.0**-12
#: Above this fraction of kept pairs the exact backward runs instead (the pair kernels run below cuBLAS's rate
#: per pair, as speed mode's block-sparse ones do: ``speed_mode.DENSE_KEPT_FRACTION``).
DENSE_KEPT_FRACTION = 0.5


def forward(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets_flat: torch.Tensor,
            spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) as ``memory_mode.forward``, and the (N, cdiv(V, BLOCK_N)) fp32 log tile masses the
    filtered backward decides from (rows of blocks without a counted row are not written; the backward masks
    them)."""
    n, v = e2d.shape[0], c.shape[0]
    cfg = tiles.tile_config(e2d.dtype, "forward")
    log_mass = torch.empty((n, triton.cdiv(v, cfg.block_n)), dtype=torch.float32, device=e2d.device)
    loss, lse = memory_mode.forward(e2d, c, bias, targets_flat, spec, log_mass=log_mass)
    return loss, lse, log_mass


def backward(e2d, c, bias, targets_flat, spec: LossSpec, lse, grad_loss, grad_lse, needs,
             grad_plogp=None, logit_scale: float = 1.0, grad_filter: GradFilter | None = None,
             tile_stats: torch.Tensor | None = None):
    """Memory mode's (dE, dC, dbias): exact (``memory_mode.backward``) without ``grad_filter``, filtered with it
    and the forward's ``tile_stats`` (this module's ``forward``). The per-token statistics' arguments
    (``grad_plogp``, ``logit_scale``) only reach the exact path: the filter belongs to the loss."""
    if grad_filter is None:
        return memory_mode.backward(e2d, c, bias, targets_flat, spec, lse, grad_loss, grad_lse, needs,
                                    grad_plogp=grad_plogp, logit_scale=logit_scale)
    if tile_stats is None or grad_plogp is not None or logit_scale != 1.0:
        raise ValueError("the filtered memory-mode backward needs the tile masses of this module's forward, on the "
                         "loss path (no per-token statistics)")
    return _filtered_backward(e2d, c, bias, targets_flat, spec, lse, grad_loss, grad_lse, needs, grad_filter,
                              tile_stats)


def _decide(log_mass: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, vocab: int,
            grad_filter: GradFilter, dtype: torch.dtype) -> ChunkFilter:
    """The filter over all rows from the forward's log tile masses (garbage on rows that do not count: masked)."""
    sums = torch.where(valid[:, None], torch.exp(log_mass - lse[:, None]), 0.0)
    block_n = tiles.tile_config(dtype, "forward").block_n
    return decide_chunk(sums, valid.float(), torch.where(valid, targets, 0), valid, vocab, block_n, grad_filter,
                        LOG_MASS_MARGIN)


def _shape_key(n: int, vocab: int, eps: float) -> tuple:
    """What identifies a memory-mode decision across calls (``filter_plan``'s remembered counts)."""
    return "memory", n, vocab, eps


def filter_bypass(e2d: torch.Tensor, c: torch.Tensor, grad_filter: GradFilter) -> bool:
    """Whether this filtered memory-mode call can run as the exact call: the shape's last deciding call kept more
    than ``DENSE_KEPT_FRACTION`` of its pairs (so it ran the exact backward) and no probe is due
    (``filter_plan.skip_filter_work``). Then the forward writes no tile masses and the backward decides nothing;
    the pairs are counted as seen, none skipped. Asked by the op before it orders the vocabulary."""
    n, v = e2d.shape[0], c.shape[0]
    pairs = triton.cdiv(n, BM) * triton.cdiv(v, BV)
    return bypass_if_dense([_shape_key(n, v, grad_filter.eps)], [pairs], DENSE_KEPT_FRACTION, grad_filter.counter,
                           e2d.device)


def tile_batches(block_counts: list[int], pairs_per_batch: int) -> list[tuple[int, int]]:
    """Consecutive ranges of tiles covering all of them, each holding at most ``pairs_per_batch`` kept pairs (or
    one tile, whatever its count: a tile has at most N / BM pairs). Why whole tiles: dC of a tile is then complete
    within one batch, written once with no fp32 accumulator over the vocabulary."""
    batches, start, held = [], 0, 0
    for k, count in enumerate(block_counts):
        if k > start and held + count > pairs_per_batch:
            batches.append((start, k))
            start, held = k, 0
        held += count
    batches.append((start, len(block_counts)))
    return batches


def _filtered_backward(e2d, c, bias, targets_flat, spec: LossSpec, lse, grad_loss, grad_lse, needs,
                       grad_filter: GradFilter, log_mass: torch.Tensor):
    need_de, need_dc, need_db = needs
    n, d = e2d.shape
    v = c.shape[0]
    targets = effective_targets(targets_flat, spec)[:n]
    valid = targets != spec.ignore_index
    plan = _decide(log_mass, lse, targets, valid, v, grad_filter, e2d.dtype)
    block_counts = plan.block_counts.tolist()  # the one host sync: sizes the batches and the grids
    kept = sum(block_counts)
    remember_counts(_shape_key(n, v, grad_filter.eps), kept)  # for filter_bypass on the next call
    if kept > DENSE_KEPT_FRACTION * plan.skipped.numel():  # exact, and faster than the pair kernels
        plan.count(grad_filter.counter, applied=False)
        return memory_mode.backward(e2d, c, bias, targets_flat, spec, lse, grad_loss, grad_lse, needs)
    plan.count(grad_filter.counter, applied=True)

    order = plan.order.long()
    e_rows = e2d[order]
    t_rows = targets[order]
    lse_rows, g_rows = lse[order].contiguous(), grad_loss[order].contiguous()
    h_rows = grad_lse[order].contiguous() if grad_lse is not None else None
    tiles_n = plan.skipped.shape[1]
    kept_mask = ~plan.skipped  # (B, T)
    tile_start_host = [0, *itertools.accumulate(block_counts)]  # tile k's first pair; the last entry is `kept`
    tile_start = torch.tensor(tile_start_host, dtype=torch.int64, device=e2d.device)
    # the pairs tile-major (tile k's kept blocks, ascending), sized from the host's counts: no second sync
    pair_tile = torch.repeat_interleave(torch.arange(tiles_n, device=e2d.device), plan.block_counts.long(),
                                        output_size=kept)
    rank = torch.arange(kept, device=e2d.device) - tile_start[pair_tile]
    pair_block = plan.blocks_of_tile[pair_tile, rank].to(torch.int32)
    pair_tile = pair_tile.to(torch.int32)
    # slot of pair (block b, tile k) = tile_start[k] + rank of b among tile k's kept blocks
    slot_grid = tile_start[:-1, None] + kept_mask.T.cumsum(1) - 1  # (T, B), meaningful where kept
    slots_of_block = slot_grid.T.gather(1, plan.tiles_of_block.long()).to(torch.int32).contiguous()
    kept_before = kept_mask.to(torch.int32).cumsum(1, dtype=torch.int32)  # (B, T): kept tiles up to k, inclusive

    eps = spec.label_smoothing
    g_counted = torch.where(t_rows != spec.ignore_index, g_rows, 0.0)  # the uniform term's g_i (times a / V)
    smooth_dc = None
    if eps and need_dc:
        smooth_dc = ((eps / v) * (g_counted[:, None] * e_rows.float()).sum(0)).contiguous()
    de_acc = torch.empty((n, d), dtype=torch.float32, device=e2d.device) if need_de else None
    dc = torch.empty_like(c) if need_dc else None
    db_acc = torch.zeros(tiles_n * BV, dtype=torch.float32, device=e2d.device) if need_db else None
    slot_bytes = BM * BV * e2d.element_size()
    batches = tile_batches(block_counts, max(1, memory_mode.DS_CHUNK_BYTES // slot_bytes))
    most = max(tile_start_host[k1] - tile_start_host[k0] for k0, k1 in batches)
    ds = torch.empty((max(most, 1), BM, BV), dtype=e2d.dtype, device=e2d.device)
    zeros_b = torch.zeros(plan.blocks, dtype=torch.int32, device=e2d.device)
    for i, (k0, k1) in enumerate(batches):
        first_pair = tile_start_host[k0]
        pairs = tile_start_host[k1] - first_pair
        pair_logit_grads(ds, e_rows, c, bias, t_rows, lse_rows, g_rows, h_rows, pair_block, pair_tile, first_pair,
                         pairs, spec.ignore_index, spec.softcap, eps)
        if dc is not None:
            pair_dc(dc, ds, e_rows, smooth_dc, pair_block, tile_start, plan.block_counts, first_pair, (k0, k1))
        if de_acc is not None:
            lo = kept_before[:, k0 - 1].contiguous() if k0 > 0 else zeros_b
            hi = kept_before[:, k1 - 1].contiguous()
            pair_de(de_acc, ds, c, slots_of_block, plan.tiles_of_block, lo, hi, first_pair, first=i == 0)
        if db_acc is not None and pairs:
            sums = ds[:pairs].sum(1, dtype=torch.float32)  # (pairs, BV) column sums of each slot
            db_acc.view(tiles_n, BV).index_add_(0, pair_tile[first_pair:first_pair + pairs].long(), sums)

    de = None
    if de_acc is not None:
        if eps:  # the uniform term on every entry: -(a/V) g_i sum_j c_j
            de_acc.sub_((eps / v) * g_counted[:, None] * torch.sum(c, 0, dtype=torch.float32))
        de = torch.empty_like(e2d).index_copy_(0, order, de_acc.to(e2d.dtype))
    db = None
    if db_acc is not None:
        db = db_acc[:v]
        if eps:
            db -= (eps / v) * g_counted.sum()
        db = db.to(bias.dtype)
    return de, dc, db
