"""``linear_cross_entropy``: the public op. Validation, dispatch between backends, autograd, reductions.

Every backend implements the same two functions on flattened rows (see ``spec.py`` for the math):
``forward(e2d, c, bias, targets_flat, spec) -> (loss_rows, lse_rows)`` and the matching ``backward``.
Reductions are ordinary torch ops on the (N,) per-row losses, so autograd hands the backend exactly the
per-row upstream gradient whatever the reduction.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from . import reference
from .precision import is_ieee_fp32
from .spec import LossSpec
from .speed import SPEED_CHUNK_BYTES, SpeedModeFunction
from .validation import validate_inputs


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """``auto`` picks Triton on CUDA devices (when Triton is installed) and the torch path elsewhere, except
    for IEEE fp32 (fp32 inputs, TF32 not opted in: ``precision.py``) on CUDA, which takes the torch path.

    Why: Hopper's tensor cores have no IEEE fp32 mode, so Triton lowers an IEEE fp32 ``tl.dot`` to CUDA-core
    FMAs far below cuBLAS's SGEMM. Measured on an H200 at N=8192, D=2304, V=256000: our fused forward took
    12.5 s where one cuBLAS SGEMM of the same size takes 181 ms (KERNEL_NOTES.md, v7). The torch path gets its
    logits from cuBLAS SGEMMs, in row chunks large enough for them (``reference.CUDA_CHUNK_BYTES``)."""
    ieee_on_cuda = device.type == "cuda" and dtype is not None and is_ieee_fp32(dtype)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() and not ieee_on_cuda else "torch"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError("impl='triton' needs the `triton` package; install it or use impl='torch'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device}); use impl='torch' or 'auto' on CPU "
                "(or set TRITON_INTERPRET=1 before importing triton, for testing)"
            )
        if ieee_on_cuda:
            warnings.warn(
                "impl='triton' with fp32 inputs and TF32 off runs the fused kernels' IEEE fp32 products on CUDA "
                "cores, ~70x slower than cuBLAS SGEMM (H200: 12.5 s vs 181 ms at N=8192, V=256000); impl='auto' "
                "takes the cuBLAS path, and torch.backends.cuda.matmul.allow_tf32 = True opts into TF32",
                stacklevel=3,
            )
    return impl


def _backend(name: str) -> tuple[Callable, Callable]:
    if name == "torch":
        return reference.torch_forward, reference.torch_backward
    from . import triton_backend  # imported lazily: importing triton is slow and absent on some platforms

    return triton_backend.triton_forward, triton_backend.triton_backward


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd glue: saves inputs and the per-row LSE; the backward pass recomputes the logits."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, impl: str):
        ctx.set_materialize_grads(False)
        forward_fn, _ = _backend(impl)
        if e2d.shape[0] == 0:
            loss = torch.zeros(0, dtype=torch.float32, device=e2d.device)
            lse = torch.zeros(0, dtype=torch.float32, device=e2d.device)
        else:
            loss, lse = forward_fn(e2d, c, bias, targets_flat, spec)
        ctx.save_for_backward(e2d, c, bias, targets_flat, lse)
        ctx.spec, ctx.impl = spec, impl
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        e2d, c, bias, targets_flat, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not any(needs):
            return None, None, None, None, None, None
        if e2d.shape[0] == 0 or (grad_loss is None and grad_lse is None):
            zero = lambda t, need: torch.zeros_like(t) if need else None  # noqa: E731
            return zero(e2d, needs[0]), zero(c, needs[1]), zero(bias, needs[2]) if bias is not None else None, None, None, None
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        _, backward_fn = _backend(ctx.impl)
        de, dc, db = backward_fn(
            e2d, c, bias, targets_flat, ctx.spec, lse,
            grad_loss.float().contiguous(),
            grad_lse.float().contiguous() if grad_lse is not None else None,
            needs,
        )
        return de, dc, db, None, None, None


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
    backend = resolve_impl(impl, e.device, e.dtype)
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
        budget = SPEED_CHUNK_BYTES if speed_chunk_bytes is None else int(speed_chunk_bytes)
        return SpeedModeFunction.apply(e2d, c_in, bias_in, targets_flat, spec, backend, reduction, budget)
    loss_rows, lse_rows = _LinearCrossEntropyFunction.apply(e2d, c_in, bias_in, targets_flat, spec, backend)

    if reduction == "none":
        loss = loss_rows.view(targets.shape)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        n_valid = reference.valid_rows(targets_flat, spec).sum()
        loss = loss_rows.sum() / n_valid.clamp_min(1)
    if return_lse:
        return loss, lse_rows.view(targets.shape)
    return loss
