"""The vocabulary order of a filtered call (``filter_eps``): high-mass entries side by side, so that the
low-mass ones fill whole tiles the filter can skip.

Why an order at all. The filter (``filtering.py``) decides per row block of 128 rows and vocabulary tile of 256
*consecutive* entries; a tile is skippable only when every row of the block has almost no mass in it. In a
tokenizer's natural order the frequent tokens are scattered over the ids, so nearly every tile holds one
entry with real mass for some row, and almost nothing is skippable (``bench/filter_stats.py``: 0% of tiles on
LM-like logits). Visiting the classifier's rows in another order changes which entries share a tile, nothing
else: the loss, the log-sum-exp and the exact gradients are sums over the vocabulary, invariant under a
permutation, and the filter's rule and proof hold for any order of the vocabulary (they speak of "tile k"
whatever entries it holds). So the bound of ``filtering.py`` is unchanged; only what it can skip changes.

Which order: decreasing *mean logit over the call's counted rows*, ``score_v = c_v . mean_i(e_i) (+ bias_v)``.
Entry v's share of the batch's softmax mass is ``sum_i exp(z_iv - lse_i)``, dominated by exp of its logit; an
entry whose logit is large on average over the batch carries mass for many rows, one whose mean logit is low
carries little for most of them. Sorting by the mean puts the entries that carry the mass in the first tiles
and leaves the later tiles to entries that are negligible for (nearly) every row of a block: the tiles the rule
skips. It is a cheap proxy (the exact per-tile masses are known only after the forward): one GEMV of V x D and
a sort of V, in fp32 under no_grad, before the forward. With a soft cap the order of the capped logits is the
same (tanh is monotone), so the uncapped score serves. Measured on LM-like logits with rows grouped by
confidence: ~75% of tiles skip at eps = 2^-12 in this order, none in the natural one (``filter_stats.py``).
On the GPU benchmark's lm regime the natural order did far better than that CPU estimate (H100, paper shape,
2026-12-07: 78.5% against this order's 83.9%), and this order still made the call 11% faster (35.6 vs 40.0
ms), at the price of its copy of c (+1.2 GB) and ~2 ms where nothing skips (BENCHMARKS.md).
The order is half of it: with the rows as drawn (confident and flat rows mixed in every block of 128), the
flat rows keep every tile and nothing skips in either order on those inputs; grouping rows by confidence is
the rule's part (``filtering.confidence_order``, on every backend), this module's is the vocabulary.

Why per call, not a running statistic kept on the model across steps (issue 23 asked which pays): the order's
own cost is one GEMV of V x D and a sort of V (well under a millisecond at V = 256,000 on a GPU); its price is
the permuted copy of c that every call runs on, and a running order needs that copy just the same (the head's
weight is a parameter in the tokenizer's order, updated by the optimizer every step). A running statistic
would save only the GEMV and sort, lag the batch it is applied to, and be one more piece of state on the
patched model; the per-call mean is exact for the rows at hand. Not built.

How it is applied, for every backend: the op runs on ``c[order]`` (and ``bias[order]``) with targets renamed
to the new positions (``new_id[t]``; ``ignore_index`` and any value outside [0, V) kept as they are, so a
shifted call's unread ``targets[..., 0]`` stays unread and unchecked), and the gradients of c and bias come
back through :class:`PermuteRows`, whose backward is a gather with the inverse permutation (not
``index_select``'s backward, which zero-fills a V x D buffer and index-adds into it). The rows of e are not
permuted, so ``shift``, ``reduction="none"`` and ``return_lse`` work unchanged and nothing needs undoing on
per-row outputs. An ``ignore_index`` that is itself a vocabulary id is kept in place (a fixed point of the
permutation), so that no renamed target collides with it.

Memory: one extra V x D copy of the classifier (in its dtype, e.g. bf16) for the duration of the call, plus,
briefly in the backward, the permuted copy of its gradient; the scores are V fp32 values. The mean and the
scores are two GEMVs in the inputs' dtype, so neither e nor c is copied for them.

Cost, measured on CPU (fp32, N=2048, D=512, V=32768, ``reduction="mean"``, memory mode, a shared 2-core
machine, 2026-12-07): the order (mean, GEMV, sort, the permuted copies of c and the targets, and the gather of
dC) took about 3% of the filtered op's forward + backward in three runs (94 ms of 3.0 s, 303 ms of 4.5 s,
347 ms of 11.1 s: the machine's load varied 3x between runs, the ratio did not). Most of it is the V x D copies
(allocating and writing 64 MiB twice), which grow with V x D while the op grows with N x V x D: with more
rows per call the share shrinks (0.8% at N=8192 in one run), with fewer it grows (22% at N=256, D=64,
V=4096). Command::

    python -m cce_patch.bench.filter_stats --order-cost

The call's own targets come first. Their tiles are protected (never skipped) in every block holding one of
their rows, so wherever the targets sit, those tiles are kept. Sorted by mean logit alone they can land all
over the vocabulary: with many distinct targets of moderate frequency (a small vocabulary, or a hundred hot
tokens each the target of ~1% of the rows) a target's mean logit is no larger than the noise of the other
entries', every tile then holds a target of some row of every block, and nothing is skippable (measured in
``tests/test_filter_triton.py``: 0 of 8 tiles by mean logit alone, every non-target tile with the targets
first). So the order is: the distinct counted targets of the call (by decreasing mean logit among
themselves), then every other entry by decreasing mean logit. One ``bincount``-sized mask on top of the GEMV.

The default, ``"auto"``, is ``"mean_logit"`` in speed mode and ``"natural"`` in memory mode
(``resolve_vocab_order``). Why not the order in memory mode: the ordered copy of c (V x D, 1.2 GB at V = 256,000,
D = 2,304 in bf16) is an input of the memory-mode autograd node, so it is held from the forward to the backward,
which memory mode's budget (one dS chunk and the fp32 dE accumulator) cannot afford; speed mode holds it only
during its one call. What the order buys in speed mode (H100, paper shape, LM-like logits: 83.9% of pairs
skipped against 78.5%, 35.6 ms against 38.6) would in memory mode be a few ms of kept-pair work, for that
memory. ``"mean_logit"`` and ``"natural"`` choose explicitly (e.g. to measure what the order buys). Without
``filter_eps`` the op never reorders, and a non-default value is refused (it would be a silent no-op).
``CCEConfig.filter_vocab_order`` carries the option to a patched model's calls.
"""

from __future__ import annotations

import torch

from .spec import LossSpec, effective_targets

#: The vocabulary orders a filtered call can use (the first is the default: the mode's own, ``resolve_vocab_order``).
FILTER_VOCAB_ORDERS = ("auto", "mean_logit", "natural")
DEFAULT_FILTER_VOCAB_ORDER = FILTER_VOCAB_ORDERS[0]


def resolve_vocab_order(value: str, speed: bool) -> str:
    """The order a filtered call uses: ``value``, or for ``"auto"`` the mode's own (``"mean_logit"`` in speed
    mode, ``"natural"`` in memory mode: see the module docstring)."""
    if value != "auto":
        return value
    return "mean_logit" if speed else "natural"


def check_filter_vocab_order(value: object, filter_eps: object) -> str:
    """``value`` if it is one of :data:`FILTER_VOCAB_ORDERS`; a non-default value needs ``filter_eps`` (without
    the filter the op never reorders, so the option would silently do nothing). ValueError otherwise."""
    if not isinstance(value, str) or value not in FILTER_VOCAB_ORDERS:
        raise ValueError(f"filter_vocab_order must be one of {FILTER_VOCAB_ORDERS}, got {value!r}")
    if filter_eps is None and value != DEFAULT_FILTER_VOCAB_ORDER:
        raise ValueError(f"filter_vocab_order={value!r} orders the vocabulary for filter_eps; it needs filter_eps "
                         "(got None)")
    return value


@torch.no_grad()
def mean_logit_scores(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None,
                      valid: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 mean logit of each vocabulary entry over the rows ``valid`` marks (uncapped):
    ``c @ mean(e[valid]) + bias``, as two GEMVs in the inputs' dtype (fp32 accumulation inside the BLAS), so
    neither e nor c is copied. The scores only choose an order, and any order is exact (module doc), so their
    rounding (to bf16 for bf16 inputs: more ties, broken by id) costs nothing but a slightly different order.
    Why not fp32 copies in chunks: measured on an H100 at the paper shape, that took ~3 ms (35 GEMVs and as many
    fp32 conversions of c's rows) where the two GEMVs read e and c once (~0.5 ms). No host sync (the count stays
    a device tensor); all rows ignored gives ``bias`` (or zeros)."""
    total = valid.to(e2d.dtype) @ e2d  # (D,): the counted rows' sum
    mean = total.float() / valid.sum().clamp_min(1).to(torch.float32)
    scores = (c @ mean.to(c.dtype)).float()
    if bias is not None:
        scores += bias.float()
    return scores


@torch.no_grad()
def mean_logit_order(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor,
                     keep: int | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """(V,) int64 ``order``: position k of the reordered vocabulary holds entry ``order[k]``; decreasing mean
    logit (stable: ties keep their ids' order), the entries among ``targets`` (the rows' targets after any
    shift; only those of ``valid`` rows count) before all others. ``keep``, a vocabulary id, stays at its own
    position (used for an ``ignore_index`` inside [0, V))."""
    scores = mean_logit_scores(e2d, c, bias, valid)
    if targets is not None and targets.numel():
        counted = torch.where(valid, targets, 0).long()  # rows that do not count vote 0 ("not a target")
        is_target = torch.zeros(scores.shape[0], dtype=torch.int32, device=scores.device).scatter_reduce_(
            0, counted, valid.to(torch.int32), "amax").bool()  # no host sync (a boolean index would need one)
        # the targets' group first, whatever the scores: an offset above the spread of the finite scores
        finite = torch.where(torch.isfinite(scores), scores, 0.0)
        offset = (finite.max() - finite.min()).abs() + 1.0
        scores = torch.where(is_target, scores + offset, scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    if keep is not None and 0 <= keep < order.numel():
        rest = order[order != keep]
        order = torch.cat((rest[:keep], order.new_tensor([keep]), rest[keep:]))
    return order


def vocabulary_order(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets_flat: torch.Tensor,
                     spec: LossSpec) -> torch.Tensor:
    """The ``"mean_logit"`` order of one call (module docstring): its counted targets (after any shift) first,
    then the rest, each group by decreasing mean logit over the counted rows; ``ignore_index`` in place."""
    targets = effective_targets(targets_flat, spec)
    valid = (targets != spec.ignore_index) & (targets >= 0) & (targets < c.shape[0])
    return mean_logit_order(e2d, c, bias, valid, keep=spec.ignore_index, targets=targets)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``new_id`` with ``new_id[order[k]] = k``: where each entry went."""
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(order.numel(), device=order.device)
    return new_id


class PermuteRows(torch.autograd.Function):
    """``x[order]`` (rows of a matrix, or entries of a vector, permuted), whose backward is the gather
    ``grad[new_id]``: one copy, where ``index_select``'s backward zero-fills an x-sized buffer and index-adds
    into it. The backward is this Function again, so it is differentiable (a double backward reaches the op's
    own refusal, ``second_order.py``, not a wrong zero)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, new_id: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order, new_id)
        return x[order]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, new_id = ctx.saved_tensors
        return PermuteRows.apply(grad, new_id, order), None, None


def rename_targets(targets: torch.Tensor, new_id: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Targets with each vocabulary id t in [0, V) replaced by ``new_id[t]``; ``ignore_index`` and values
    outside [0, V) (a shifted call's unread first positions) kept as they are. Same dtype and shape."""
    vocab = new_id.numel()
    inside = (targets >= 0) & (targets < vocab) & (targets != ignore_index)
    renamed = new_id[torch.where(inside, targets, 0).long()].to(targets.dtype)
    return torch.where(inside, renamed, targets)


def order_vocabulary(
    e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, targets_flat: torch.Tensor, spec: LossSpec,
    how: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The (c, bias, targets) a filtered call runs on: the vocabulary in ``how``'s order (see the module
    docstring), gradients of c and bias routed back to the original order. ``"natural"`` returns them as
    they are."""
    if how == "natural" or c.shape[0] == 0:
        return c, bias, targets_flat
    order = vocabulary_order(e2d, c, bias, targets_flat, spec)
    new_id = inverse_permutation(order)
    c_sorted = PermuteRows.apply(c, order, new_id)
    bias_sorted = PermuteRows.apply(bias, order, new_id) if bias is not None else None
    return c_sorted, bias_sorted, rename_targets(targets_flat, new_id, spec.ignore_index)

