"""Gradient filtering (``filter_eps``): skip the softmax part of the gradient where it is provably negligible.

The gradient of the loss with respect to logit z_ij (``spec.py``) is

    dz_ij = s_ij * ( (g_i + h_i) * p_ij  -  g_i * (1 - a) * [j == t_i]  -  g_i * a / V )

(s_ij = 1 - tanh^2(z_ij / softcap) in (0, 1], or 1 without a soft cap; g_i, h_i the upstream gradients of row
i's loss and log-sum-exp; a the label smoothing). On confident rows most p_ij are tiny, yet an exact method
multiplies every one of them into dE = dZ @ C, dC = dZ^T @ E and dbias = sum_i dZ_i. Filtering drops the
``(g_i + h_i) p_ij`` term on whole tiles where the dropped probability of every row is at most ``eps``.

The rule (one decision per row block and vocabulary tile, computable from per-(row, tile) statistics):

- Rows (of the flattened (N, D) hidden states; with ``shift`` each row's target is the next position's) are
  grouped in blocks of ``BM`` rows, the vocabulary in tiles of ``BV`` consecutive entries (tile k: entries
  [k*BV, (k+1)*BV), the last one possibly shorter). The blocks are BM consecutive rows of a row order: each
  chunk of rows a backend processes (a chunk is whole blocks) is sorted by confidence first
  (``confidence_order``: the entropy of the rows' tile masses, rows that do not count first), so that
  confident rows share blocks; one flat row in a block of confident ones would keep every tile for all of them.
  Both backends use this order (the torch path in ``filter_probs_``, Triton in ``fused/filter_plan.py``); their
  decisions differ only where their chunks do. The helpers below take rows already in their order.
- m_ik = sum_{j in tile k} p_ij, the softmax mass of row i in tile k (0 for a row that does not count).
- M_bk = max_{i in block b} m_ik, the block's mass bound.
- Protected: tile k of block b if it holds the target of a counted row of the block. Never skipped.
- Per block b, the unprotected tiles are taken in increasing order of M_bk (ties by tile index: a stable sort)
  and skipped while the running sum of their M_bk stays <= ``eps * BUDGET_FACTOR``; the first tile that would
  exceed it, and every later one, is kept. (``skipped_from_bounds``.)

Proof of the bound. It holds for any partition of the rows into blocks (any row order). Let S_b be the
skipped tiles of block b and i a row in it. Its dropped mass is
``sum_{k in S_b} m_ik <= sum_{k in S_b} M_bk <= eps`` (m_ik <= M_bk by definition of the max). The target term
and the uniform label-smoothing term are never dropped (the target's tile is protected; ``-g_i a / V`` is kept
on every entry here, and a block-sparse kernel adds it as the rank-one term it is, whatever it skips:
dE_i -= (a/V) g_i sum_j c_j, dC_j -= (a/V) sum_i g_i e_i, dbias_j -= (a/V) sum_i g_i), so the only change to dz_ij is
d_ij = s_ij (g_i + h_i) p_ij on skipped entries, and with w_i = |g_i + h_i| and 0 <= s_ij <= 1:

    sum_{j dropped} |d_ij| <= w_i * eps                                            (every row i)
    ||dE_i - dE_i^exact||_2 = ||sum_j d_ij c_j|| <= w_i * eps * max_j ||c_j||_2        (every row i)
    ||dC - dC^exact||_F  = ||sum_i d_i^T e_i||_F <= sum_i ||d_i||_2 ||e_i|| <= eps * sum_i w_i ||e_i||_2
    ||dbias - dbias^exact||_1 <= sum_i ||d_i||_1 <= eps * sum_i w_i

w_i is the row's loss weight times the upstream gradient: 1/n_valid for ``reduction="mean"``, 1 for ``"sum"``,
the per-row upstream gradient for ``"none"``, plus the LSE's upstream gradient with ``return_lse``. The
bounds are on the values computed in fp32 before the gradients are rounded to their dtype (that rounding, as
in the exact op, comes on top). The loss and the log-sum-exp are not affected: the forward is exact.

What the bound does not say: it is absolute, not relative. A row whose non-target probability is itself about
eps (p_target >= 1 - eps) has a gradient of that size, and may lose most of it: its dE row stays within
w_i * eps * max||c||, but relative to the row's own (tiny) gradient the error can be O(1) (synthetic rows with
the target logit 24 above the rest: dE relative error 0.5 at eps = 2^-12, every row within 4% of its bound).
On the ``lm`` regime with sorted rows and vocabulary the whole dE is within 1e-4 of exact (bench/filter_stats.py).

Rounding of the decision itself. "p_ij" above is the softmax of the fp32 logits the op computes (the exact
path uses the same ones). The decision reads fp32 estimates of it: exp of (z_ij - lse_i), whose fp32 rounding
is a relative 2^-14 for |logits| <= 2^8, then sums of at most BV entries (m_ik) and of at most V/BV bounds (the
running sum), a relative (BV + V/BV) * 2^-24 <= 2^-11.9 for V <= 2^20. ``BUDGET_FACTOR = 1 - 2^-10`` absorbs
both, so the true dropped mass stays <= eps as stated (for larger logits or vocabularies the margin shrinks
by the same relative amounts, far below any dtype's resolution).

A soft cap with label smoothing is refused: there the smoothing term is s_ij * g_i * a / V, which is no longer
rank one (s_ij depends on the logit), so it could neither be kept on skipped tiles without computing them nor
be dropped within the bound (speed mode refuses the combination for the same reason).

Where the statistics come from. The chunked torch path (``chunked_torch.py``) forms the probabilities of a chunk
of whole row blocks anyway, takes m_ik as tile sums of them (``tile_masses``) and zeroes the skipped tiles'
probabilities before forming dZ (``filter_probs_``): same rule, same bound, but no time saved on CPU (the
dense products still run). The Triton backend filters in speed mode (``fused/speed_mode.py``): its storing
forward writes q_ij = exp(z_ij - anchor_i) [* s_ij] (0 at the target) in the input dtype and, per row and
column tile, the fp32 sum of exp(z_ij - anchor_i) it formed for the LSE anyway (``lse_kernel.store_tile_mass``;
chunk rows x V/64 bytes); with a_i = exp(anchor_i - lse_i) known after the chunk, m_ik = (1 + u) a_i * that sum
bounds the mass of the stored values the gradient is formed from (u the unit roundoff of q's dtype: each stored
q_ij rounds the fp32 one to nearest; with a soft cap the stored values carry s_ij <= 1 and only shrink; the
quantity the proof bounds is sum_j |d_ij| / w_i, so an upper bound of it keeps the proof;
``lse_kernel.MASS_FROM_STORED`` sums the stored values themselves instead). Per chunk, the rows are sorted by
the entropy of their tile masses,
``block_bounds``, ``protected_tiles`` and ``skipped_from_bounds`` (plain torch ops, on the GPU, no host sync)
decide, and block-sparse kernels (``fused/sparse_grads.py``) form dE and dC from the kept (block, tile) pairs
only, or, where most pairs are kept, cuBLAS forms them exactly from all of q (no faster skipped, so not skipped;
the counter says so). dbias is exact on both (one column sum of all of q costs what a filtered one would).
Triton's memory mode (``fused/memory_filter.py``) decides from the log tile masses its forward leaves (the LSE
is not known while it streams), over all rows at once, and recomputes and multiplies only the kept pairs, with
e gathered into the row order (``fused/pair_grads.py``); fp16 inputs take the torch path
(``backends._filtering_impl``).

Vocabulary order. The rule reads tiles of consecutive entries, and the proof holds for any order of the
vocabulary; what it can skip depends on the order. The op visits the classifier in decreasing mean logit over
the call's rows (``filter_order.py``, ``filter_vocab_order``), so that the entries carrying the mass share the
first tiles and the later tiles hold (nearly) none: a permutation of c's rows and the targets' ids, undone on
dC and dbias, with the loss and the bound unchanged.

Counting. A :class:`FilterCounter` passed to the op (``filter_counter=``), or the one a ``CCEConfig`` with
``filter_eps`` owns (``config.filter_counter``, drained by the Trainer callback into the logs as
``cce_filter_skipped_fraction`` and friends), accumulates the (row block, tile) pairs seen and skipped and the
largest dropped mass of a row, as device tensors (no host sync until read). Blocks whose rows are all ignored
have bounds 0 and count as skipped: their gradient is 0, and a kernel does no work there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

#: Rows per row block and vocabulary entries per tile: the tiles of issue 23's measurement (128 x 256).
BM = 128
BV = 256
#: The fraction of ``eps`` the running sums may reach: absorbs the fp32 rounding of the decision (see above).
BUDGET_FACTOR = 1.0 - 2.0**-10


def check_filter_eps(value: object) -> float | None:
    """None (exact gradients) or a finite number in (0, 1): each row's dropped softmax mass bound."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"filter_eps must be None (exact) or a finite number in (0, 1), got {value!r}")
    return float(value)


def filter_problem(softcap: float | None, label_smoothing: float) -> str | None:
    """Why ``filter_eps`` cannot keep its bound for these options, or None when it can."""
    if softcap is not None and label_smoothing > 0:
        return ("filter_eps does not combine softcap with label_smoothing (the smoothing term's gradient is then "
                "no longer rank one, so dropping a tile would break the bound); use filter_eps=None")
    return None


@dataclass(frozen=True)
class FilterStats:
    """A snapshot of a :class:`FilterCounter`, in Python numbers."""

    tiles_seen: int
    tiles_skipped: int
    max_row_dropped_mass: float

    @property
    def skipped_fraction(self) -> float:
        return self.tiles_skipped / self.tiles_seen if self.tiles_seen else 0.0

    def log_entries(self, prefix: str = "cce_filter_") -> dict[str, float]:
        """The Trainer's log fields."""
        return {f"{prefix}skipped_fraction": self.skipped_fraction,
                f"{prefix}max_row_dropped_mass": self.max_row_dropped_mass}


class FilterCounter:
    """What the filter did over the calls that filled it: (row block, vocabulary tile) pairs seen and skipped,
    and the largest dropped softmax mass of one row (<= filter_eps by the bound). Totals are kept as device
    tensors, so filling it costs no host sync; reading a property syncs."""

    def __init__(self) -> None:
        self._seen: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None
        self._max_mass: torch.Tensor | None = None

    def add(self, seen: int, skipped: torch.Tensor, max_mass: torch.Tensor) -> None:
        """Accumulate one decision: ``seen`` pairs, ``skipped`` (0-dim int) of them skipped, ``max_mass`` (0-dim
        float) the largest dropped mass of a row."""
        skipped, max_mass = skipped.detach().to(torch.int64), max_mass.detach().to(torch.float32)
        if self._seen is None:
            self._seen = torch.zeros((), dtype=torch.int64, device=skipped.device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=skipped.device)
            self._max_mass = torch.zeros((), dtype=torch.float32, device=skipped.device)
        self._seen += seen
        self._skipped += skipped.to(self._skipped.device)
        torch.maximum(self._max_mass, max_mass.to(self._max_mass.device), out=self._max_mass)

    def add_unskipped(self, seen: int, device: torch.device) -> None:
        """Accumulate ``seen`` pairs of which none was skipped (gradients formed exactly)."""
        nothing = torch.zeros((), dtype=torch.int64, device=device)
        self.add(seen, nothing, nothing.float())

    def stats(self) -> FilterStats:
        if self._seen is None:
            return FilterStats(0, 0, 0.0)
        seen, skipped = torch.stack((self._seen, self._skipped)).tolist()
        return FilterStats(int(seen), int(skipped), float(self._max_mass))

    def reset(self) -> None:
        self._seen = self._skipped = self._max_mass = None

    def drain(self) -> FilterStats:
        """The stats so far, and a fresh start (the Trainer callback reports each logging window)."""
        stats = self.stats()
        self.reset()
        return stats

    @property
    def tiles_seen(self) -> int:
        return self.stats().tiles_seen

    @property
    def tiles_skipped(self) -> int:
        return self.stats().tiles_skipped

    @property
    def skipped_fraction(self) -> float:
        return self.stats().skipped_fraction

    @property
    def max_row_dropped_mass(self) -> float:
        return self.stats().max_row_dropped_mass

    def __repr__(self) -> str:
        s = self.stats()
        return (f"FilterCounter(tiles_seen={s.tiles_seen}, tiles_skipped={s.tiles_skipped}, "
                f"max_row_dropped_mass={s.max_row_dropped_mass:.3g})")


@dataclass(frozen=True)
class GradFilter:
    """The filter of one call: its ``eps`` and where to count what it did (or None)."""

    eps: float
    counter: FilterCounter | None = None


def make_grad_filter(filter_eps: object, filter_counter: object, softcap: float | None,
                     label_smoothing: float) -> GradFilter | None:
    """The call's filter from the op's arguments, validated (ValueError/TypeError before any work)."""
    eps = check_filter_eps(filter_eps)
    if filter_counter is not None and not isinstance(filter_counter, FilterCounter):
        raise TypeError(f"filter_counter must be a cce_patch.ops.FilterCounter or None, got {filter_counter!r}")
    if eps is None:
        if filter_counter is not None:
            raise ValueError("filter_counter counts what filter_eps skips; it needs filter_eps (got None)")
        return None
    problem = filter_problem(softcap, label_smoothing)
    if problem is not None:
        raise ValueError(problem)
    return GradFilter(eps, filter_counter)


def block_rows(rows: int) -> int:
    """``rows`` rounded to whole row blocks (at least one): the chunk size of a filtering chunked path, so that
    every block's rows are in one chunk."""
    return max(BM, rows // BM * BM)


def tile_masses(p: torch.Tensor) -> torch.Tensor:
    """(rows, T) fp32 mass of each row in each vocabulary tile, T = ceil(V / BV), from (rows, V) probabilities."""
    rows, vocab = p.shape
    full = vocab // BV
    parts = [p[:, : full * BV].reshape(rows, full, BV).sum(-1, dtype=torch.float32)] if full else []
    if vocab % BV:
        parts.append(p[:, full * BV:].sum(-1, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def _blocks(rows: int) -> int:
    return -(-rows // BM)


def confidence_order(masses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(rows,) int64: rows sorted by the entropy of their tile masses, -sum_k m_ik log m_ik (ascending, stable);
    rows that do not count first.

    Why this key: a block's bound on tile k is the max over its rows, so one row that spreads its mass over many
    tiles keeps all of them for the whole block. The entropy of the tile masses is small exactly when a row's
    mass sits in a few tiles (whichever they are) and large when it is spread, so sorting by it puts the rows
    that can afford to drop most tiles together, and the spread rows, which skip nothing, in blocks of their own.
    It needs no threshold (unlike "mass outside the top tiles", which needs to know how many tiles to keep).
    Rows that do not count (mass 0) go first: their blocks have bound 0 everywhere and skip every tile."""
    m = masses.clamp_min(0.0)
    entropy = -(m * torch.log(m.clamp_min(1e-30))).sum(1)
    key = torch.where(valid, entropy, torch.full_like(entropy, -1.0))
    return torch.sort(key, stable=True).indices


def block_bounds(masses: torch.Tensor) -> torch.Tensor:
    """(B, T) block mass bounds M_bk = max over the block's rows of m_ik, from (rows, T) masses in their row
    order (block b: rows b*BM .. (b+1)*BM - 1 of it; the last block may be short). Rows that do not count must
    have mass 0."""
    rows, tiles = masses.shape
    pad = _blocks(rows) * BM - rows
    if pad:
        masses = torch.cat((masses, masses.new_zeros(pad, tiles)))
    return masses.view(-1, BM, tiles).amax(1)


def protected_tiles(targets: torch.Tensor, valid: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B, T) bool: the tiles holding the target of a counted row of each block (never skipped); ``targets`` and
    ``valid`` in the row order of the blocks (as ``block_bounds``)."""
    rows = targets.shape[0]
    # Counted rows add 1 at their (block, target tile), the others 0: no boolean indexing, whose nonzero() would
    # make the host wait for the GPU in the middle of each chunk's decision (integer sums do not depend on order).
    hits = torch.zeros(_blocks(rows), tiles, dtype=torch.int32, device=targets.device)
    block = torch.arange(rows, device=targets.device) // BM
    tile = torch.where(valid, targets, 0) // BV
    hits.index_put_((block, tile), valid.to(torch.int32), accumulate=True)
    return hits > 0


def skipped_from_bounds(bounds: torch.Tensor, protected: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, T) bool: the rule. Per block, unprotected tiles in increasing order of their bound (stable), skipped
    while the running sum of bounds stays <= ``eps * BUDGET_FACTOR``. NaN bounds (non-finite logits) stop it."""
    key = bounds.float().masked_fill(protected, math.inf)
    ordered, order = torch.sort(key, dim=1, stable=True)
    take = ordered.cumsum(1) <= eps * BUDGET_FACTOR  # a prefix: the bounds are >= 0
    return torch.zeros_like(take).scatter_(1, order, take)


def rows_skipped(skipped: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(rows, T) bool: each row's skipped tiles, in the rows' own order, from the (B, T) decision on blocks of
    BM consecutive rows of ``order`` (row ``order[i]`` sits at position i)."""
    rows = order.numel()
    per_sorted = skipped.repeat_interleave(BM, 0)[:rows]
    return torch.empty_like(per_sorted).index_copy_(0, order.long(), per_sorted)


def filter_probs_(p: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, grad_filter: GradFilter) -> None:
    """Apply the rule to one chunk of rows: ``p`` (rows, V) fp32 probabilities, 0 on rows that do not count; the
    rows ordered by ``confidence_order`` and taken in blocks of BM of that order (as the Triton backend does);
    the skipped tiles' entries are set to 0 in place, and the counter, if any, is filled."""
    rows, vocab = p.shape
    masses = tile_masses(p)
    order = confidence_order(masses, valid)  # the blocks are BM consecutive rows of this order
    skipped = skipped_from_bounds(block_bounds(masses[order]),
                                  protected_tiles(targets[order], valid[order], masses.shape[1]), grad_filter.eps)
    per_row = rows_skipped(skipped, order)
    full = vocab // BV
    if full:
        p[:, : full * BV].view(rows, full, BV).masked_fill_(per_row[:, :full, None], 0.0)
    if vocab % BV:
        p[:, full * BV:].masked_fill_(per_row[:, full:], 0.0)
    if grad_filter.counter is not None:
        dropped = (masses * per_row).sum(1)
        grad_filter.counter.add(skipped.numel(), skipped.sum(), dropped.max() if rows else dropped.new_zeros(()))
