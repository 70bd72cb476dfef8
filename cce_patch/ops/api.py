"""``linear_cross_entropy``: the public op. Validation, dispatch, reductions.

One call: validate every input (``validation.py``, before any kernel launch), pick the backend
(``backends.resolve_impl``), describe the loss once (``spec.LossSpec``), and run it through the autograd
Function of the chosen mode (``memory_mode.py`` or ``speed_mode.py``). Reductions are ordinary torch ops on
the (N,) per-row losses, so autograd hands the backend exactly the per-row upstream gradient whatever the
reduction.
"""

from __future__ import annotations

import torch

from .backends import get_backend, resolve_impl
from .memory_mode import MemoryModeFunction
from .spec import LossSpec, valid_rows
from .speed_mode import SpeedModeFunction, speed_chunk_budget
from .validation import validate_inputs


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
    mode: str = "memory",
    speed_chunk_bytes: int | None = None,
    check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``e @ c.T (+ bias)`` against ``targets``, without materializing the logits.

    Args:
        e: ``(..., D)`` hidden states (fp32, fp16 or bf16).
        c: ``(V, D)`` classifier, e.g. ``lm_head.weight``; same dtype as ``e``.
        targets: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)`` classifier bias, added before ``softcap``.
        ignore_index: targets with this value contribute nothing (loss 0, gradient 0).
        softcap: if set, logits are ``softcap * tanh(logits / softcap)`` (Gemma 2 uses 30.0).
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (shape of ``targets``, 0 at
            ignored positions). If every target is ignored, ``"mean"`` returns 0 with zero gradients (not NaN).
        shift: causal-LM shift: position ``t`` of the last sequence dimension is scored against target
            ``t + 1``; the last position of each sequence is ignored. Nothing is copied. Per-token outputs
            keep the shape of ``targets`` and are aligned with ``e`` (position ``t`` holds the loss of
            predicting ``targets[..., t + 1]``).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        return_lse: also return the per-token log-sum-exp (fp32, shape of ``targets``, 0 at ignored positions),
            differentiable, e.g. for a z-loss ``(lse ** 2).sum() / n``.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere and for IEEE fp32, see ``resolve_impl``),
            ``"triton"`` or ``"torch"``.
        mode: how the gradients are obtained; both are exact.
            ``"memory"`` (default): the backward pass recomputes the logits chunk by chunk; memory above
            the inputs stays within ~1.25x the gradients (4 GEMMs of N x D x V in all).
            ``"speed"``: for a scalar loss (``reduction`` "mean"/"sum", no ``return_lse``) the gradients are
            formed during the forward pass (3 GEMMs) in chunks of token rows whose unnormalised
            probabilities take ``speed_chunk_bytes``; bf16 and fp32 only. Without autograd (no_grad, or
            no input requiring grad) it is the plain forward. The forward then costs what forward+backward
            costs; backward is nearly free.
        speed_chunk_bytes: byte budget of speed mode's chunk (default 2 GiB); smaller means less memory and
            more, smaller GEMMs.
        check_targets: verify target values lie in ``[0, V)`` (one reduction; a host sync on GPU). Turning it
            off is faster and unsafe: an out-of-range target is then undefined behaviour.

    Returns:
        The fp32 loss (a scalar, or per-token for ``reduction="none"``), and the LSE if ``return_lse``.

    Non-contiguous ``e`` or ``targets`` are made contiguous first (a copy); gradients are computed only for
    the tensors that require them. Accumulation is always fp32.
    """
    validate_inputs(
        e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
        label_smoothing=label_smoothing, impl=impl, check_targets=check_targets, mode=mode,
        return_lse=return_lse, speed_chunk_bytes=speed_chunk_bytes,
    )
    backend = get_backend(resolve_impl(impl, e.device, e.dtype))
    d = e.shape[-1]
    e2d = e.reshape(-1, d)
    if e2d.stride(-1) != 1 or (e2d.shape[0] > 1 and e2d.stride(0) != d):
        e2d = e2d.contiguous()
    targets_flat = targets.reshape(-1)
    if not targets_flat.is_contiguous():
        targets_flat = targets_flat.contiguous()
    c_in = c if c.is_contiguous() else c.contiguous()
    bias_in = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    spec = LossSpec(
        ignore_index=ignore_index,
        softcap=float(softcap) if softcap is not None else None,
        label_smoothing=float(label_smoothing),
        shift_period=targets.shape[-1] if shift else 0,
    )
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (e2d, c_in, bias_in)
    )
    if mode == "speed" and wants_grad and e2d.shape[0] > 0:
        return SpeedModeFunction.apply(e2d, c_in, bias_in, targets_flat, spec, backend, reduction,
                                       speed_chunk_budget(speed_chunk_bytes))
    loss_rows, lse_rows = MemoryModeFunction.apply(e2d, c_in, bias_in, targets_flat, spec, backend)

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
