"""``linear_cross_entropy``: the public op. Validation, dispatch, reductions.

One call: apply autocast's input casts (``autocast.py``), validate every input (``validation.py``, before any
kernel launch), pick the backend (``backends.resolve_impl``), describe the loss once (``spec.LossSpec``), and
run it through the autograd Function of the chosen mode (``memory_mode.py`` or ``speed_mode.py``), or, while
``torch.compile`` traces, through the custom ops of ``compiled.py``. Reductions are ordinary torch ops on the
(N,) per-row losses, so autograd hands the backend exactly the per-row upstream gradient whatever the
reduction.
"""

from __future__ import annotations

import torch

from . import compiled
from .autocast import autocast_inputs
from .backends import filtered_mode, get_backend, resolve_impl
from .dtensor_layouts import has_dtensor, replicated_local, vocab_dim
from .filter_order import DEFAULT_FILTER_VOCAB_ORDER, check_filter_vocab_order, order_vocabulary, resolve_vocab_order
from .filtering import FilterCounter, make_grad_filter
from .memory_mode import MemoryModeFunction
from .mode_choice import choose_mode, note_speed_oom
from .spec import LossSpec, flat_operands, valid_rows
from .speed_mode import SpeedModeFunction
from .validation import check_scored_targets, scored_targets_ok, validate_inputs
from .vocab_parallel import dtensor_vocab_parallel


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool = False,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    impl: str = "auto",
    mode: str = "auto",
    speed_chunk_bytes: int | None = None,
    check_targets: bool = True,
    filter_eps: float | None = None,
    filter_counter: FilterCounter | None = None,
    filter_vocab_order: str = DEFAULT_FILTER_VOCAB_ORDER,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``e @ c.T (+ bias)`` against ``targets``, without materializing the logits.

    The loss and gradients of ``F.cross_entropy(softcap(e @ c.T + bias), targets, ...)`` (with the causal shift
    if ``shift``), with the logits formed and kept in fp32: never rounded to the input dtype.

    Args:
        e: ``(..., D)`` hidden states (fp32, fp16 or bf16).
        c: ``(V, D)`` classifier, e.g. ``lm_head.weight``; same dtype as ``e`` outside autocast (as
            ``F.linear`` requires). Under ``torch.autocast`` on ``e``'s device both are cast to the autocast
            dtype, as autocast casts ``F.linear``'s inputs (so an fp32 ``lm_head.weight`` with bf16 or fp32
            hidden states works as it does stock); the casts are differentiable, and the gradients reach
            ``e``, ``c`` and ``bias`` in their own dtypes.
        targets: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)`` float tensor, the classifier bias, added before ``softcap``.
        ignore_index: an ``int`` (not a tensor, not None): targets with this value contribute nothing (loss 0,
            gradient 0).
        softcap: ``None`` or a positive finite cap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2
            uses 30.0); accurate to fp32 rounding for every cap.
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (shape of ``targets``, 0 at
            ignored positions). If every target is ignored, ``"mean"`` returns 0 with zero gradients (not NaN).
        shift: causal-LM shift: position ``t`` of the last sequence dimension is scored against target
            ``t + 1``; the last position of each sequence is ignored, and ``targets[..., 0]`` is never read (nor
            checked). Nothing is copied. Per-token outputs keep the shape of ``targets`` and are aligned with
            ``e`` (position ``t`` holds the loss of predicting ``targets[..., t + 1]``).
        label_smoothing: in ``[0, 1]``, as in ``torch.nn.functional.cross_entropy`` (1 is the uniform target
            alone).
        return_lse: also return the per-token log-sum-exp (fp32, shape of ``targets``, 0 at ignored positions),
            differentiable, e.g. for a z-loss ``(lse ** 2).sum() / n``.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere and for IEEE fp32, see ``resolve_impl``),
            ``"triton"`` or ``"torch"``.
        mode: how the gradients are obtained; both are exact.
            ``"auto"`` (default): speed mode where it can compute the call, its working set takes at most half
            the free memory and the call is large enough to gain from it; memory mode otherwise. Decided once
            per shape and logged once (``mode_choice.py``).
            ``"memory"``: the backward pass recomputes the logits chunk by chunk; memory above
            the inputs stays within ~1.25x the gradients (4 GEMMs of N x D x V in all).
            ``"speed"``: for a scalar loss (``reduction`` "mean"/"sum", no ``return_lse``) the gradients are
            formed during the forward pass (3 GEMMs) in chunks of token rows whose unnormalised
            probabilities take ``speed_chunk_bytes``; bf16 and fp32 only (the dtype after autocast's cast:
            ``autocast.compute_dtype``). Without autograd (no_grad, or no input requiring grad) it is the
            plain forward. The forward then costs what forward+backward costs; backward is nearly free.
        speed_chunk_bytes: byte budget of speed mode's chunk of unnormalised probabilities; smaller means less
            memory and more, smaller GEMMs. None (default): the chunks ``speed_plan.py`` plans, the fewest whose
            working set stays below what ``torch.compile`` of the plain loss holds (0.6x of it where chunks of
            >= 2048 rows allow), each at most 2 GiB.
        check_targets: verify target values lie in ``[0, V)`` (one reduction; a host sync on GPU, which the
            Triton speed path shares with its own after the forward). Turning it off is faster and unsafe: an
            out-of-range target is then undefined behaviour.
        filter_eps: ``None`` (default): exact gradients. A number in (0, 1) opts into gradient filtering
            (``filtering.py`` states the rule and proves the bound): per row block of 128 rows and vocabulary
            tile of 256 entries, tiles whose softmax mass is negligible are left out of the gradients, never a
            target's tile, so that each counted row's dropped probability mass is at most ``filter_eps``. Then,
            with w_i = |upstream gradient of row i's loss (+ of its LSE)| (1/n_valid for "mean", 1 for "sum"
            under ``loss.backward()``): each row of dE is off by at most ``w_i * filter_eps * max_v ||c_v||``,
            dC by at most ``filter_eps * sum_i w_i ||e_i||`` (Frobenius), dbias by at most
            ``filter_eps * sum_i w_i`` (L1), before rounding to the gradients' dtype; the loss and LSE stay
            exact, label smoothing's uniform term is kept exactly, softcap keeps the bound (with label
            smoothing it is refused). The torch path filters in both modes; the Triton backend in both modes for
            bf16 and fp32 inputs, skipping the dropped tiles' gradient work (memory mode: their recompute too):
            ``impl="auto"`` takes it on CUDA (``mode="auto"`` is then speed mode where speed mode can run the
            call, else memory mode), and the torch path for fp16 (warning on CUDA), where ``impl="triton"`` is
            refused. DTensor inputs and ``torch.compile`` are refused too.
        filter_counter: a ``cce_patch.ops.filtering.FilterCounter`` that accumulates what the filter skipped
            (tiles seen and skipped, largest dropped mass of a row); needs ``filter_eps``.
        filter_vocab_order: with ``filter_eps``, the order the vocabulary is visited in (``filter_order.py``):
            ``"mean_logit"``: decreasing mean logit over the call's counted rows, so that high-mass entries
            share tiles and the rest can be skipped (the loss, the bound and the gradients' meaning are
            unchanged; one extra copy of ``c`` for the call, which memory mode would hold until its backward);
            ``"natural"``: as given; ``"auto"`` (default): ``"mean_logit"`` in speed mode, ``"natural"`` in
            memory mode. A non-default value needs ``filter_eps``.

    Returns:
        The fp32 loss (a scalar, or per-token for ``reduction="none"``), and the LSE if ``return_lse``.

    Raises:
        TypeError / ValueError: for any input the op cannot compute, naming the argument, before any kernel
            launch (under ``torch.compile``, out-of-range targets raise the same ValueError when the compiled
            code runs).
        DoubleBackwardError: (a RuntimeError) when a derivative of the op's gradients is requested, e.g. after
            ``backward(create_graph=True)``; first-order gradients under ``create_graph=True`` are returned.

    Precision: products accumulate in fp32, and the log-sum-exp, softmax and reductions are fp32, whatever
    autocast is on (the op runs its own arithmetic with autocast off). Under ``torch.compile`` (also with
    ``fullgraph=True``) the op is one custom-op node in the forward graph and one in the backward graph
    (``compiled.py``), running the same kernels as eager. Non-contiguous ``e`` or ``targets`` are made
    contiguous first (a copy); gradients are computed only for the tensors that require them.

    DTensor inputs (FSDP2 / tensor-parallel parameters) go to :func:`dtensor_linear_cross_entropy`: a classifier
    split over the vocabulary (``Shard(0)``) runs vocab-parallel across its mesh (``vocab_parallel.py``), other
    layouts are refused by name.
    """
    grad_filter = make_grad_filter(filter_eps, filter_counter, softcap, label_smoothing)  # None: exact
    check_filter_vocab_order(filter_vocab_order, filter_eps)
    e, c, bias = autocast_inputs(e, c, bias)
    if grad_filter is not None and (has_dtensor(e, c, targets, bias) or torch.compiler.is_compiling()):
        raise ValueError("filter_eps is not supported with DTensor inputs (vocab-parallel) or under torch.compile "
                         "yet; use filter_eps=None there")
    if has_dtensor(e, c, targets, bias):
        return dtensor_linear_cross_entropy(
            e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
            label_smoothing=label_smoothing, return_lse=return_lse, impl=impl, mode=mode,
            speed_chunk_bytes=speed_chunk_bytes, check_targets=check_targets,
        )
    compiling = torch.compiler.is_compiling()
    validate_inputs(  # every check but the target values, which come after the mode is known (below)
        e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
        label_smoothing=label_smoothing, impl=impl, check_targets=check_targets, mode=mode,
        return_lse=return_lse, speed_chunk_bytes=speed_chunk_bytes, read_values=False,
    )
    backend_name = resolve_impl(impl, e.device, e.dtype, filtered=grad_filter is not None, mode=mode,
                                reduction=reduction, return_lse=return_lse)
    mode = filtered_mode(mode, backend_name, grad_filter is not None, e.dtype, reduction, return_lse)
    e2d, c_in, targets_flat, bias_in = flat_operands(e, c, targets, bias)
    spec = LossSpec(
        ignore_index=int(ignore_index),
        softcap=float(softcap) if softcap is not None else None,
        label_smoothing=float(label_smoothing),
        shift_period=targets.shape[-1] if shift else 0,
    )
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (e2d, c_in, bias_in)
    )
    auto = mode == "auto"
    if auto:  # speed or memory mode for this shape (mode_choice.py)
        mode = choose_mode(e2d, c_in, backend_name, wants_grad=wants_grad, reduction=reduction, return_lse=return_lse,
                           softcap=softcap, label_smoothing=label_smoothing, speed_chunk_bytes=speed_chunk_bytes)
    speed = mode == "speed" and wants_grad and e2d.shape[0] > 0
    if grad_filter is not None and wants_grad and e2d.shape[0] and not compiling:  # nothing to skip last time
        bypass = get_backend(backend_name).filter_bypass
        if bypass is not None and bypass(e2d, c_in, grad_filter, speed_chunk_bytes, "speed" if speed else "memory"):
            grad_filter = None
    targets_ok = None  # the target check: here (a host sync), or at the Triton speed path's own sync
    if check_targets and not compiling:
        if speed and grad_filter is None and get_backend(backend_name).speed_checks_targets_late:
            targets_ok = scored_targets_ok(targets_flat, c_in.shape[0], spec.ignore_index, spec.shift_period)
        else:
            check_scored_targets(targets_flat, c_in.shape[0], spec.ignore_index, spec.shift_period)
    if grad_filter is not None:  # high-mass vocabulary entries side by side (filter_order.py); loss unchanged
        c_in, bias_in, targets_flat = order_vocabulary(e2d, c_in, bias_in, targets_flat, spec,
                                                       resolve_vocab_order(filter_vocab_order, speed))
    if compiling:  # one custom op node per direction (compiled.py); the target check runs inside it
        if speed:
            return compiled.speed_loss(e2d, c_in, bias_in, targets_flat, spec, backend_name, reduction,
                                       speed_chunk_bytes, check_targets)
        loss_rows, lse_rows = compiled.memory_rows(e2d, c_in, bias_in, targets_flat, spec, backend_name,
                                                   check_targets, return_lse)
    elif speed:
        try:
            return SpeedModeFunction.apply(e2d, c_in, bias_in, targets_flat, spec, get_backend(backend_name),
                                           reduction, speed_chunk_bytes, grad_filter, targets_ok)
        except torch.OutOfMemoryError:
            if not auto:
                raise
            note_speed_oom(e2d, c_in, backend_name, speed_chunk_bytes)  # this call, and the shape from now on
            speed = False
            if targets_ok is not None:  # the late check never ran: memory mode checks before its launches
                check_scored_targets(targets_flat, c_in.shape[0], spec.ignore_index, spec.shift_period)
    if not compiling and not speed:
        loss_rows, lse_rows = MemoryModeFunction.apply(e2d, c_in, bias_in, targets_flat, spec,
                                                       get_backend(backend_name), grad_filter)

    if reduction == "none":
        loss = loss_rows.view(targets.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        n_valid = valid_rows(targets_flat, spec).sum()
        loss = loss_rows.sum() / n_valid.clamp_min(1)
    if return_lse:
        return loss, lse_rows.view(targets.shape)
    return loss


def dtensor_linear_cross_entropy(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None, **options: object
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``linear_cross_entropy`` for DTensor inputs (FSDP2 or tensor-parallel parameters).

    A classifier split over the vocabulary (``Shard(0)`` on one mesh dimension, ``Replicate`` on the others)
    runs vocab-parallel over that dimension's process group; a replicated classifier runs the ordinary op on
    its local copy. The hidden states, targets and a bias that is not split like the classifier must be plain
    tensors or replicated DTensors. Anything else raises a ``ValueError`` naming the layout, before any compute.
    The result is a plain tensor, the same on every rank of the group. Here, not in ``vocab_parallel.py``,
    because the replicated case is this op again: the imports run one way (api -> vocab_parallel).
    """
    dim = vocab_dim(c) if has_dtensor(c) else None
    e_local = replicated_local("the hidden states e", e, feature_dim=True)
    targets_local = replicated_local("targets", targets)
    if dim is None:  # replicated classifier (or a plain one with DTensor e / targets): nothing is sharded
        c_local = replicated_local("the classifier", c)
        bias_local = replicated_local("bias", bias)
        return linear_cross_entropy(e_local, c_local, targets_local, bias=bias_local, **options)
    return dtensor_vocab_parallel(e_local, c, targets_local, dim, bias=bias, **options)
