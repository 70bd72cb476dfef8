"""Gradient filtering on the Triton backend's speed mode: the decision for one chunk of rows, on the GPU.

The storing forward (``lse_kernel.store_tile_mass``) leaves, per row i and BLOCK_N-wide column tile, the fp32
sum of the q_ij it formed (before rounding and the softcap factor; ``lse_kernel.MASS_FROM_STORED`` sums the
stored values instead). From those and the row scales a_i = exp(anchor_i - lse_i) this module forms the rule
of ``ops/filtering.py`` and the index lists the block-sparse gradient kernels (``sparse_grads.py``) walk:

1. m_ik = margin * a_i * sum_{j in tile k} q_ij, row i's mass in the BV-wide tile k (BV / BLOCK_N adjacent
   sums; on the GPU BLOCK_N = BV), ``margin`` = 1 + q's unit roundoff (``lse_kernel.tile_mass_margin``) so that
   it bounds the mass of the stored q the gradient is formed from. q is 0 at the target, and the target's tile
   is protected anyway; with a soft cap the stored q carries the derivative factor s_ij <= 1, so the bound
   holds for exactly the quantity the proof bounds (sum |d_ij|).
2. A row order (``filtering.confidence_order``, as on every backend) that puts rows of similar confidence next
   to each other; blocks are BM consecutive rows of that order. The proof in filtering.py holds for any partition of the rows.
3. Per block: bounds, protected target tiles and the skipped set (``filtering.block_bounds``,
   ``protected_tiles``, ``skipped_from_bounds``: plain torch ops on the GPU), the counter filled as
   ``filtering.filter_probs_`` fills it.
4. The kept (block, tile) pairs as padded index lists, no host sync: per block its kept tiles (dE's walk), per
   tile its kept blocks (dC's walk), each list sorted ascending with a count (a stable sort of the mask).
5. The counts the launcher chooses by (dense cuBLAS or block-sparse, and the dE split): a performance choice
   only, since the bound holds on either path. Reading them right away would make the host wait for the chunk's
   storing kernel; so from the second call of a shape the choice reads the same chunk's counts from the previous
   call (``chunk_counts``: copied to the host without blocking, read once that copy has landed), which a training
   run's slowly changing statistics make a good guess. The first call of a shape reads its own.
6. Where the last deciding call of a shape ran every chunk dense (nothing worth skipping), the next calls run as
   the exact call (no tile masses, no decisions: ``skip_filter_work``), counted as seen with nothing skipped,
   except every ``PROBE_EVERY``-th, which decides again, so that a model that becomes confident as it trains
   gets the filter back within that many steps. Memory mode shares this (``memory_filter.filter_bypass``, its
   call one "chunk" of all rows, its counts given by ``remember_counts``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..filtering import (
    BM,
    BV,
    FilterCounter,
    GradFilter,
    block_bounds,
    confidence_order,
    protected_tiles,
    rows_skipped,
    skipped_from_bounds,
)


@dataclass(frozen=True)
class ChunkFilter:
    """The decision for one chunk of ``rows`` rows (chunk-local indices)."""

    order: torch.Tensor  # (rows,) int32: the row order; block b holds order[b*BM : (b+1)*BM]
    skipped: torch.Tensor  # (B, T) bool, B = cdiv(rows, BM), T = cdiv(V, BV)
    tiles_of_block: torch.Tensor  # (B, T) int32: block b's kept tiles first, ascending
    tile_counts: torch.Tensor  # (B,) int32: how many tiles block b keeps
    blocks_of_tile: torch.Tensor  # (T, B) int32: tile k's kept blocks first, ascending
    block_counts: torch.Tensor  # (T,) int32: how many blocks keep tile k
    max_dropped: torch.Tensor  # 0-dim fp32: the largest mass a row drops if the skipped pairs are left out

    @property
    def blocks(self) -> int:
        return self.skipped.shape[0]

    def row_skipped(self) -> torch.Tensor:
        """(rows, T) bool: the skipped tiles of each row, in the chunk's own row order."""
        return rows_skipped(self.skipped, self.order)

    def count(self, counter: FilterCounter | None, applied: bool) -> None:
        """Add this chunk to ``counter``: its pairs, and the skipped ones and the largest dropped row mass only if
        the skip was ``applied`` (a chunk run dense keeps every pair: its gradients are the exact ones)."""
        if counter is None:
            return
        if applied:
            counter.add(self.skipped.numel(), self.skipped.sum(), self.max_dropped)
        else:
            counter.add_unskipped(self.skipped.numel(), self.skipped.device)


def tile_masses_from_sums(sums: torch.Tensor, a: torch.Tensor, vocab: int, block_n: int) -> torch.Tensor:
    """(rows, T) fp32 m_ik from the kernel's (rows, cdiv(V, block_n)) sums of q and the row scales a (0 on rows
    that do not count). Groups of BV / block_n adjacent sums make one BV tile (the last group may be short)."""
    if BV % block_n:
        raise ValueError(f"the storing kernel's column tile ({block_n}) must divide the filter's tile BV={BV}")
    rows, narrow = sums.shape
    tiles = math.ceil(vocab / BV)
    group = BV // block_n
    if tiles * group != narrow:  # pad the last group to a whole one (zeros add nothing)
        sums = torch.cat((sums, sums.new_zeros(rows, tiles * group - narrow)), 1)
    return sums.view(rows, tiles, group).sum(-1) * a[:, None]


def _kept_lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``kept`` (bool), the column indices where it is True first (ascending), and their count."""
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices
    return order.to(torch.int32), kept.sum(1, dtype=torch.int32)


def decide_chunk(sums: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, vocab: int,
                 block_n: int, grad_filter: GradFilter, margin: float = 1.0) -> ChunkFilter:
    """The filter of one chunk: ``sums`` the storing kernel's tile sums of q, ``a`` the rows' scales (0 where a
    row does not count), ``targets`` the rows' targets (anything where not ``valid``), ``margin`` the factor
    that makes the sums bound those of the stored q (``lse_kernel.tile_mass_margin``). The caller counts it
    (``ChunkFilter.count``) once it knows whether the skip is applied."""
    masses = tile_masses_from_sums(sums, a * margin if margin != 1.0 else a, vocab, block_n)
    idx = confidence_order(masses, valid)
    order = idx.to(torch.int32)
    sorted_masses = masses[idx]
    skipped = skipped_from_bounds(block_bounds(sorted_masses),
                                  protected_tiles(targets[idx], valid[idx], masses.shape[1]), grad_filter.eps)
    rows = masses.shape[0]
    if grad_filter.counter is not None and rows:
        max_dropped = (sorted_masses * skipped.repeat_interleave(BM, 0)[:rows]).sum(1).max()
    else:  # nobody reads it
        max_dropped = masses.new_zeros(())
    kept = ~skipped
    tiles_of_block, tile_counts = _kept_lists(kept)
    blocks_of_tile, block_counts = _kept_lists(kept.T)
    return ChunkFilter(order, skipped, tiles_of_block.contiguous(), tile_counts, blocks_of_tile.contiguous(),
                       block_counts, max_dropped)


#: (chunk rows, V, eps, chunk index) -> the last call's (kept pairs, most tiles kept by a block) of that chunk, as a
#: host tensor filled by a non-blocking copy, and the CUDA event after which it holds them (None on the CPU).
_last_counts: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.Event | None]] = OrderedDict()
#: Most chunk shapes remembered (least recently used dropped first).
MAX_REMEMBERED_CHUNKS = 256


def chunk_key(rows: int, vocab: int, eps: float, index: int) -> tuple:
    """What identifies a chunk across calls: its rows, the vocabulary, the filter's eps and its place in the call."""
    return rows, vocab, eps, index


def _landed(key: tuple) -> list[int] | None:
    """The previous call's (kept pairs, most tiles kept by a block) of chunk ``key``, once its copy has reached the
    host (reading the pinned tensor then costs no device sync), else None."""
    remembered = _last_counts.get(key)
    if remembered is None or (remembered[1] is not None and not remembered[1].query()):
        return None
    return remembered[0].tolist()


def chunk_counts(plan: ChunkFilter, key: tuple) -> tuple[int, int]:
    """(kept pairs, most tiles kept by one block) for choosing how to run this chunk: the previous call's counts of
    the same chunk (``key``, ``chunk_key``) when they have reached the host, else this chunk's own, read now (a
    host sync: the first call of a shape). This chunk's counts are copied to the host without waiting, for the
    next call."""
    remembered = _landed(key)
    counts = torch.stack((plan.tile_counts.sum(), plan.tile_counts.max()))
    if remembered is not None:
        kept, most_kept = remembered
        _last_counts.move_to_end(key)
    else:
        kept, most_kept = _read_now(counts)
    if counts.is_cuda:
        host = torch.empty(2, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = counts, None
    _last_counts[key] = (host, event)
    if len(_last_counts) > MAX_REMEMBERED_CHUNKS:
        _last_counts.popitem(last=False)
    return kept, most_kept


def remember_counts(key: tuple, kept: int, most_kept: int = 0) -> None:
    """Record a decision whose counts the host already holds (memory mode reads them for its batches), for
    ``skip_filter_work`` on the next call of the shape (which reads ``kept`` only; ``most_kept`` sizes speed
    mode's dE split)."""
    _last_counts[key] = (torch.tensor([kept, most_kept]), None)
    _last_counts.move_to_end(key)
    if len(_last_counts) > MAX_REMEMBERED_CHUNKS:
        _last_counts.popitem(last=False)


def _read_now(counts: torch.Tensor) -> list[int]:
    """The chunk's own counts, waiting for the GPU to form them (the first call of a shape)."""
    return counts.tolist()


#: A shape whose chunks all ran dense in its last deciding call skips the filter's work on this many calls in
#: a row, then decides again (the probe).
PROBE_EVERY = 16
#: (the call's chunk keys) -> calls run without the filter's work since that shape last decided.
_calls_since_probe: dict[tuple, int] = {}


def skip_filter_work(chunk_keys: list[tuple], pairs: list[int], dense_fraction: float) -> bool:
    """Whether this call can run as the exact call: every chunk (``chunk_keys`` as for ``chunk_counts``, ``pairs``
    each chunk's (row block, tile) pairs) kept more than ``dense_fraction`` of its pairs in the last deciding call
    of the shape, whose counts have reached the host, and the probe is not due (a probe forgets those counts, so
    that it chooses from its own). Host work only: dict lookups and event queries."""
    shape = tuple(chunk_keys)
    since = _calls_since_probe.get(shape, 0)
    if since >= PROBE_EVERY:  # the probe: its chunks choose from their own counts, not from the stale dense ones
        for key in chunk_keys:
            _last_counts.pop(key, None)
        dense = False
    else:
        landed = [_landed(key) for key in chunk_keys]
        dense = all(counts is not None and counts[0] > dense_fraction * total
                    for counts, total in zip(landed, pairs, strict=True))
    _calls_since_probe[shape] = since + 1 if dense else 0
    if len(_calls_since_probe) > MAX_REMEMBERED_CHUNKS:
        _calls_since_probe.pop(next(iter(_calls_since_probe)))
    return dense


def bypass_if_dense(chunk_keys: list[tuple], pairs: list[int], dense_fraction: float, counter: FilterCounter | None,
                    device: torch.device) -> bool:
    """``skip_filter_work`` for a call about to run (either mode's ``filter_bypass``), and, when it is skipped,
    its pairs counted as seen with none skipped (the call's gradients are the exact ones)."""
    if not skip_filter_work(chunk_keys, pairs, dense_fraction):
        return False
    if counter is not None:
        counter.add_unskipped(sum(pairs), device)
    return True


def forget_chunk_counts() -> None:
    """Drop every remembered count and probe countdown (tests that need each call to decide from its own data)."""
    _last_counts.clear()
    _calls_since_probe.clear()
