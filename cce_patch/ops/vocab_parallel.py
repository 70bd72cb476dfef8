"""Vocab-parallel CCE: the loss of a head whose classifier is split over the vocabulary across a process group.

The tensor-parallel layout (a ``ColwiseParallel`` ``lm_head``, transformers' ``tp_plan="auto"``): every rank of
the group holds the same hidden states ``e`` and targets, and its own contiguous block of classifier rows
``[start, start + V_r)`` (rank order, ``torch.chunk``'s split for a ``Shard(0)`` DTensor). No rank ever holds the
full ``[N, V]`` logits or the full weight. With ``z`` the logits and ``a`` the label smoothing, per row:

    lse  = log sum_r exp(lse_r)                 one MAX all-reduce (m = max_r lse_r), then one SUM all-reduce
    z_t  = z of the target, from its owner       (packed into the same SUM all-reduce as sum_r exp(lse_r - m))
    S    = sum_r sum_{j in r} z_j                (label smoothing only; a matvec per rank, same all-reduce)
    loss = lse - (1 - a) z_t - (a / V) S

Each rank's ``lse_r`` comes from the ordinary backend forward on its shard (blockwise, as for one device), with
a stand-in target (local class 0) on rows whose target another rank owns, so every counted row stays counted;
the owner's ``z_t`` is ``lse_r - loss_r`` of an unsmoothed local forward. The backward is the ordinary backend
backward on the shard with the *global* LSE: spec.py's logit gradient restricted to local columns is
``g (1 - a) (p - [j == t]) + (h + g a) p`` on the owner rank and ``(g + h) p`` elsewhere, which is exactly what
the backend computes for ``grad_loss = g (1 - a)`` (owner) / ``0`` (others) and ``grad_lse = h + g a`` / ``g + h``;
smoothing's ``-g a / V`` term is rank one (added as a matvec and a broadcast, hence no softcap with smoothing).
dE is all-reduced (a sum over the shards' contributions), dC and dbias stay local.

Public entry points: :func:`vocab_parallel_linear_cross_entropy` (plain tensors plus a process group) and
:func:`dtensor_vocab_parallel`, which ``linear_cross_entropy`` calls for a ``Shard(0)`` DTensor classifier. The
op itself reads the layout of DTensor inputs with ``dtensor_layouts.vocab_dim`` and ``replicated_local`` (a
replicated classifier is the ordinary op on the local copy; every other layout is refused, naming it, before any
compute), so this module never imports the op (``api.py``): the imports run one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .autocast import autocast_inputs, autocast_off
from .backends import Backend, get_backend, resolve_impl
from .dtensor_layouts import describe_placements, has_dtensor
from .second_order import guard_second_order
from .spec import LossSpec, effective_targets, flat_operands, valid_rows
from .validation import check_scored_targets, validate_inputs

#: Printed in errors: what a vocab-parallel call expects of its inputs.
_LAYOUT_HINT = (
    "vocab-parallel CCE expects every rank of the group to pass the same hidden states and targets and its own "
    "contiguous block of classifier rows (the tensor-parallel lm_head layout)"
)


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's classifier rows sit in the vocabulary, and the group that holds the others."""

    group: Any  # a torch.distributed ProcessGroup (None: the default group)
    world: int
    start: int
    rows: int
    vocab: int


def _chunk_range(vocab: int, world: int, index: int) -> tuple[int, int]:
    """(start, rows) of block ``index`` of ``torch.chunk(range(vocab), world)``: the split of a Shard(0) DTensor."""
    size = -(-vocab // world)
    start = min(index * size, vocab)
    return start, max(0, min(size, vocab - start))


def dtensor_vocab_parallel(e: torch.Tensor, c: Any, targets: torch.Tensor, dim: int, *, bias: Any = None,
                           **options: Any) -> Any:
    """The loss of a DTensor classifier split over the vocabulary on mesh dimension ``dim`` (``Shard(0)`` there,
    ``Replicate`` elsewhere: ``vocab_dim(c)``), vocab-parallel over that dimension's process group, given the
    plain hidden states and targets every rank of it holds (``replicated_local``). The bias, if any, must be
    split like the classifier. ``linear_cross_entropy`` decides the layout (``api.dtensor_linear_cross_entropy``)
    and calls this for the vocab-parallel one; the result is a plain tensor, the same on every rank of the group.
    """
    if bias is not None:
        if not has_dtensor(bias) or tuple(bias.placements) != tuple(c.placements) or bias.device_mesh != c.device_mesh:
            raise ValueError(
                "linear_cross_entropy: a vocab-parallel classifier needs its bias split the same way "
                f"(a DTensor with {describe_placements(c)}), got "
                + (describe_placements(bias) if has_dtensor(bias) else "a plain tensor")
            )
        bias = bias.to_local()
    mesh = c.device_mesh
    world = mesh.size(dim)
    vocab = c.shape[0]
    start, rows = _chunk_range(vocab, world, mesh.get_local_rank(dim))
    c_local = c.to_local()
    if c_local.shape[0] != rows:
        raise ValueError(
            f"linear_cross_entropy: the classifier DTensor ({describe_placements(c)}, global shape {tuple(c.shape)}) holds "
            f"{c_local.shape[0]} local rows on this rank where torch.chunk's even split gives {rows}; uneven "
            "custom shards are supported through vocab_parallel_linear_cross_entropy(vocab_start=...)"
        )
    shard = VocabShard(group=mesh.get_group(dim), world=world, start=start, rows=rows, vocab=vocab)
    return _vocab_parallel(e, c_local, targets, shard, bias=bias, **options)


# ---------------------------------------------------------------------------------------------------------------
# Plain tensors plus a process group
# ---------------------------------------------------------------------------------------------------------------


def vocab_parallel_linear_cross_entropy(
    e: torch.Tensor,
    c_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool = False,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    impl: str = "auto",
    mode: str = "memory",
    speed_chunk_bytes: int | None = None,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``linear_cross_entropy(e, c, targets, ...)`` where ``c`` is split over the vocabulary across ``group``.

    Every rank calls this with the same ``e`` ``(..., D)`` and ``targets`` (global class ids in ``[0, V)``) and
    its own rows ``c_shard`` ``(V_r, D)`` of the classifier (``bias``: its ``(V_r,)`` slice). The loss (and the
    LSE with ``return_lse``) is that of the full classifier, identical on every rank; ``e``'s gradient is the
    full one on every rank (all-reduced), ``c_shard``'s and ``bias``'s are those of the local rows.

    Args:
        group: the process group holding the shards (None: the default group).
        vocab_start, vocab_size: where this rank's rows start, and V. When not given, the shards are taken to be
            contiguous in rank order (rank r's rows start after those of ranks < r) and both are found with one
            small all-gather of the shard sizes.
        check_targets: as for ``linear_cross_entropy`` (targets in ``[0, V)``), and also that every rank passed
            the same ``e`` and ``targets`` and shards that tile ``[0, V)``: one small all-gather and a host sync.
            Data-parallel inputs with a vocab-sharded weight (an FSDP-sharded head read outside its module) are
            then refused instead of giving a wrong loss.
        mode: ``"memory"`` only: speed mode forms each row's gradients while its logits exist, before the
            all-reduce that gives the global LSE, so it is refused for a vocab-parallel head.

    The other arguments are ``linear_cross_entropy``'s. Every rank must make the call (it runs collectives in
    forward and backward).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_linear_cross_entropy needs an initialised torch.distributed process group")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = c_shard.shape[0] if c_shard.dim() == 2 else -1
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("give both vocab_start and vocab_size, or neither (contiguous shards in rank order)")
    if vocab_start is not None and not (0 <= vocab_start and vocab_start + max(rows, 0) <= vocab_size):
        raise ValueError(f"this rank's rows [{vocab_start}, {vocab_start + rows}) do not fit in vocab_size={vocab_size}")
    shard = VocabShard(group=group, world=world, start=vocab_start if vocab_start is not None else -1, rows=rows,
                       vocab=vocab_size if vocab_size is not None else -1)
    if vocab_start is None and not check_targets:  # the check below finds them as a by-product
        sizes = _all_gather_longs(torch.tensor([rows], device=e.device), group, world)[:, 0].tolist()
        shard = VocabShard(group=group, world=world, start=int(sum(sizes[:rank])), rows=rows, vocab=int(sum(sizes)))
    return _vocab_parallel(
        e, c_shard, targets, shard, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction,
        shift=shift, label_smoothing=label_smoothing, return_lse=return_lse, impl=impl, mode=mode,
        speed_chunk_bytes=speed_chunk_bytes, check_targets=check_targets,
    )


def _all_gather_longs(local: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """(world, k) int64: every rank's ``local`` (k,) int64 vector."""
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out)


def _fingerprint(e2d: torch.Tensor, targets_flat: torch.Tensor) -> list[int]:
    """Integers that agree across ranks when ``e`` and ``targets`` do (bit patterns of two fp64 sums of e, two
    checksums of the targets): the consistency check costs two passes over e, not a comparison of e itself."""
    t = targets_flat.long()
    position = torch.arange(1, t.numel() + 1, device=t.device)
    sums = torch.stack((e2d.sum(dtype=torch.float64), e2d[:, :1].sum(dtype=torch.float64)))
    return [*sums.view(torch.int64).tolist(), int(t.sum()), int((t * position).sum())]


def _check_group(e2d: torch.Tensor, targets_flat: torch.Tensor, shard: VocabShard, ignore_index: int,
                 shift_period: int) -> VocabShard:
    """Refuse inconsistent calls before any collective that assumes equal shapes, and complete ``shard``."""
    me = [e2d.shape[0], e2d.shape[1], shard.rows, shard.start, shard.vocab, *_fingerprint(e2d, targets_flat)]
    table = _all_gather_longs(torch.tensor(me, dtype=torch.int64, device=e2d.device), shard.group, shard.world).tolist()
    rank = dist.get_rank(shard.group)
    if any(row[:2] != table[0][:2] for row in table):
        raise ValueError(
            f"vocab-parallel linear_cross_entropy: the ranks of the group pass hidden states of different shapes "
            f"({[tuple(row[:2]) for row in table]} as (rows, D)); {_LAYOUT_HINT}"
        )
    if any(row[5:] != table[0][5:] for row in table):
        raise ValueError(
            "vocab-parallel linear_cross_entropy: the hidden states or targets differ across the ranks of the group "
            f"that holds the classifier's shards; {_LAYOUT_HINT}. Here the ranks are data-parallel (each has its own "
            "batch) yet each holds only a block of the classifier's rows: a data-parallel shard, such as an FSDP2 "
            "parameter read outside its module's forward, where FSDP has not gathered it. Gather it before the "
            "loss (FSDPModule.unshard() on the fully_shard group that holds it, as a patched model does for its "
            "head), or put that module in the root's group"
        )
    sizes = [row[2] for row in table]
    if shard.start < 0:
        starts = [sum(sizes[:r]) for r in range(shard.world)]
        vocab = sum(sizes)
    else:
        starts = [row[3] for row in table]
        vocab = table[0][4]
        if any(row[4] != vocab for row in table):
            raise ValueError(f"vocab-parallel linear_cross_entropy: the ranks disagree on vocab_size ({[r[4] for r in table]})")
    covered = sorted(zip(starts, sizes, strict=True))
    tiles = all(a + n == b for (a, n), (b, _) in zip(covered[:-1], covered[1:], strict=True)) and covered[0][0] == 0
    if not tiles or covered[-1][0] + covered[-1][1] != vocab:
        raise ValueError(
            "vocab-parallel linear_cross_entropy: the ranks' classifier rows "
            f"{[(a, a + n) for a, n in zip(starts, sizes, strict=True)]} do not tile the vocabulary [0, {vocab}) exactly once"
        )
    # the targets the loss reads, against the whole head's vocabulary (the ordinary op's check and message)
    check_scored_targets(targets_flat, vocab, ignore_index, shift_period)
    return VocabShard(group=shard.group, world=shard.world, start=starts[rank], rows=shard.rows, vocab=vocab)


def _vocab_parallel(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    shard: VocabShard,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool = False,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    impl: str = "auto",
    mode: str = "memory",
    speed_chunk_bytes: int | None = None,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Validate, then run the vocab-parallel Function and reduce, as ``linear_cross_entropy`` does."""
    e, c, bias = autocast_inputs(e, c, bias)  # under autocast: the dtype autocast gives F.linear (autocast.py)
    # the ordinary op's checks (shapes, dtypes, options) on this rank's shard, which may be empty when V < world;
    # targets are checked against the whole vocabulary in _check_group
    shard_for_checks = c if c.dim() != 2 or c.shape[0] > 0 else c.new_empty((1, c.shape[1]))
    bias_for_checks = bias if bias is None or bias.shape[0] > 0 else bias.new_empty((1,))
    validate_inputs(
        e, shard_for_checks, targets, bias=bias_for_checks, ignore_index=ignore_index, softcap=softcap,
        reduction=reduction, shift=shift, label_smoothing=label_smoothing, impl=impl, check_targets=False, mode=mode,
        return_lse=return_lse, speed_chunk_bytes=speed_chunk_bytes,
    )
    if mode == "speed":
        raise ValueError(
            "mode='speed' forms each row's gradients while its logits exist, before the all-reduce across the "
            "vocabulary shards gives the row's log-sum-exp, so it cannot run a vocab-parallel (tensor-parallel) "
            "head; use mode='memory'"
        )
    if softcap is not None and label_smoothing > 0:
        raise ValueError(
            "vocab-parallel linear_cross_entropy does not combine softcap with label_smoothing (the smoothing "
            "term's gradient is then no longer rank one); use one of them"
        )
    e2d, c_in, targets_flat, bias_in = flat_operands(e, c, targets, bias)
    if check_targets:
        shard = _check_group(e2d, targets_flat, shard, ignore_index, targets.shape[-1] if shift else 0)
    spec = LossSpec(
        ignore_index=int(ignore_index), softcap=float(softcap) if softcap is not None else None,
        label_smoothing=float(label_smoothing), shift_period=targets.shape[-1] if shift else 0,
    )
    backend = get_backend(resolve_impl(impl, e.device, e.dtype))
    loss_rows, lse_rows = _VocabParallelFunction.apply(e2d, c_in, bias_in, targets_flat, spec, backend, shard)
    if reduction == "none":
        loss = loss_rows.view(targets.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / valid_rows(targets_flat, spec).sum().clamp_min(1)
    if return_lse:
        return loss, lse_rows.view(targets.shape)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------


#: The backend's ignore_index on a shard: never a local class id, whatever the caller's ignore_index is (a caller
#: may ignore a real class, e.g. the pad token, which must not collide with the stand-in target 0).
_LOCAL_IGNORE = -1


def _local_rows(targets_flat: torch.Tensor, spec: LossSpec, shard: VocabShard):
    """(valid, owner, local targets): counted rows, rows whose target is in this shard, and each row's target in
    local class ids (the owner's own, a stand-in 0 for rows another rank owns, _LOCAL_IGNORE where not counted)."""
    valid = valid_rows(targets_flat, spec)
    t = effective_targets(targets_flat, spec)
    owner = valid & (t >= shard.start) & (t < shard.start + shard.rows)
    stand_in = torch.where(valid, torch.zeros_like(t), torch.full_like(t, _LOCAL_IGNORE))
    return valid, owner, torch.where(owner, t - shard.start, stand_in)


def _local_spec(spec: LossSpec) -> LossSpec:
    """The backend's view: unshifted (targets are pre-shifted), unsmoothed (smoothing is added here)."""
    return LossSpec(ignore_index=_LOCAL_IGNORE, softcap=spec.softcap)


class _VocabParallelFunction(torch.autograd.Function):
    """Per-row (loss, lse) of the whole vocabulary from this rank's shard; see the module docstring."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, backend: Backend, shard: VocabShard):
        ctx.set_materialize_grads(False)
        n = e2d.shape[0]
        valid, owner, local = _local_rows(targets_flat, spec, shard)
        if n == 0:
            zeros = torch.zeros(0, dtype=torch.float32, device=e2d.device)
            loss, lse = zeros, zeros.clone()
        else:
            loss, lse = _forward_rows(e2d, c, bias, spec, backend, shard, valid, owner, local)
        ctx.save_for_backward(e2d, c, bias, local, lse, valid, owner)
        ctx.spec, ctx.backend, ctx.shard = spec, backend, shard
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        e2d, c, bias, local, lse, valid, owner = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        nothing = (None,) * 4
        if not any(needs):
            return None, None, None, *nothing
        zero = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
        grads = zero(e2d, needs[0]), zero(c, needs[1]), zero(bias, needs[2])
        if e2d.shape[0] > 0 and (grad_loss is not None or grad_lse is not None):
            with torch.no_grad(), autocast_off(e2d.device):
                grads = _backward_rows(e2d, c, bias, local, lse, valid, owner, ctx.spec, ctx.backend, ctx.shard,
                                       grad_loss, grad_lse, needs, grads)
        return *guard_second_order(grads), *nothing


def _forward_rows(e2d, c, bias, spec: LossSpec, backend: Backend, shard: VocabShard, valid, owner, local):
    """Per-row (loss, lse) of the whole vocabulary: the shard's backend forward, then the two all-reduces."""
    n, a = e2d.shape[0], spec.label_smoothing
    with autocast_off(e2d.device):
        if shard.rows > 0:
            loss_r, lse_r = backend.forward(e2d, c, bias, local, _local_spec(spec))
        else:  # an empty shard (V < world): contributes exp(-inf) = 0 to every row
            loss_r = torch.zeros(n, dtype=torch.float32, device=e2d.device)
            lse_r = torch.where(valid, float("-inf"), 0.0)
        m = lse_r.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
        parts = [torch.where(valid, torch.exp(lse_r - m), 0.0), torch.where(owner, lse_r - loss_r, 0.0)]
        if a:
            parts.append(_logit_sums(e2d, c, bias) if shard.rows > 0 else torch.zeros_like(m))
        summed = torch.stack(parts)
        dist.all_reduce(summed, group=shard.group)
        lse = torch.where(valid, m + torch.where(valid, summed[0], 1.0).log(), 0.0)
        loss = lse - (1.0 - a) * summed[1]
        if a:
            loss = loss - (a / shard.vocab) * summed[2]
        return torch.where(valid, loss, 0.0), lse


def _backward_rows(e2d, c, bias, local, lse, valid, owner, spec: LossSpec, backend: Backend, shard: VocabShard,
                   grad_loss, grad_lse, needs, zeros):
    """(dE, dC, dbias): the shard's backend backward with the global LSE (module docstring), dE all-reduced."""
    de, dc, db = zeros
    a = spec.label_smoothing
    g = grad_loss.float() if grad_loss is not None else torch.zeros_like(lse)
    h = grad_lse.float() if grad_lse is not None else torch.zeros_like(lse)
    g = torch.where(valid, g, 0.0)
    if shard.rows > 0:
        row_grad_loss = torch.where(owner, g * (1.0 - a), 0.0).contiguous()
        row_grad_lse = (h + torch.where(owner, g * a, g)).contiguous()
        de, dc, db = backend.backward(e2d, c, bias, local, _local_spec(spec), lse, row_grad_loss, row_grad_lse, needs)
        if a:
            de, dc, db = _add_smoothing_grads(e2d, c, g, a / shard.vocab, de, dc, db)
    if de is not None:
        dist.all_reduce(de, group=shard.group)
    return de, dc, db


def _logit_sums(e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(N,) fp32 sum over this shard's classes of each row's logit (no softcap): ``e @ sum_j c_j + sum_j b_j``."""
    total = e2d.float() @ c.sum(0, dtype=torch.float32)
    return total + bias.sum(dtype=torch.float32) if bias is not None else total


def _add_smoothing_grads(e2d, c, g, scale, de, dc, db):
    """Add label smoothing's ``-g a / V`` logit gradient, the same for every class: dE_i += -s g_i sum_j c_j,
    dC_j += -s sum_i g_i e_i (every row j), dbias_j += -s sum_i g_i."""
    w = -scale * g
    if de is not None:
        de = (de.float() + w[:, None] * c.sum(0, dtype=torch.float32)).to(de.dtype)
    if dc is not None:
        dc = (dc.float() + (w @ e2d.float())[None, :]).to(dc.dtype)
    if db is not None:
        db = (db.float() + w.sum()).to(db.dtype)
    return de, dc, db
