"""The op as ``torch.library`` custom ops: what ``torch.compile`` sees of ``linear_cross_entropy``.

Why: Dynamo cannot trace into Triton launchers, a host sync (the target check, speed mode's range check) or
an ``autograd.Function`` that keeps state on ``ctx``; each is a graph break, or with ``fullgraph=True`` an
error. As custom ops with fake (shape-only) implementations and registered autograd formulas, the loss
is one opaque node in the forward graph and one in the backward graph: the rest of the model compiles around
it, and our kernels run exactly as in eager (same backend functions, same numerics).

``api.linear_cross_entropy`` routes here only while ``torch.compiler.is_compiling()``; eager calls keep the
autograd Functions of ``memory_mode.py`` / ``speed_mode.py``, so eager pays nothing for the registration.
Inside the ops' real implementations, which run with real tensors, the target range is checked (the same
check and error as eager, raised when the compiled code runs) and autocast is off, as in eager.

Ops (``torch.ops.cce_patch.*``):

- ``memory_forward -> (loss_rows, lse_rows)``, with autograd through ``memory_backward -> (dE, dC, dbias)``;
- ``speed_forward -> (loss, dE, dC, dbias)``: the scalar loss and its gradients (``weight`` folded in), whose
  autograd formula scales the saved gradients by the incoming scalar. A row out of speed mode's range is
  recomputed inside the op (forward, then the memory-mode backward), so the graph has one shape whatever
  the data.

Gradients that are not needed come back as empty placeholders (a custom op returns tensors, not None).
Double backward under compile is refused by AOTAutograd itself ("does not currently support double
backward").
"""

from __future__ import annotations

import torch

from .autocast import autocast_off
from .backends import get_backend
from .spec import LossSpec, valid_rows
from .validation import check_scored_targets

Tensor = torch.Tensor
#: The forward ops may sync with the host (the target check; speed mode's range check), which a CUDA graph
#: cannot capture: tagged, inductor's cudagraphs (mode="reduce-overhead") leave them outside the graph.
_SYNCS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _spec(ignore_index: int, softcap: float | None, label_smoothing: float, shift_period: int) -> LossSpec:
    return LossSpec(ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing,
                    shift_period=shift_period)


def _placeholder(like: Tensor) -> Tensor:
    """What an op returns for a gradient nobody asked for."""
    return like.new_empty((0,))


def _or_placeholder(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else _placeholder(like)


# ---------------------------------------------------------------------------------------------------- memory


@torch.library.custom_op("cce_patch::memory_forward", mutates_args=(), tags=_SYNCS)
def memory_forward(
    e2d: Tensor, c: Tensor, bias: Tensor | None, targets_flat: Tensor, ignore_index: int, softcap: float | None,
    label_smoothing: float, shift_period: int, backend: str, check_targets: bool, lse_has_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row (loss, lse), fp32 (N,). ``lse_has_grad``: whether the caller returns the LSE (so its gradient
    is real, not autograd's zero fill); read by the autograd formula only."""
    if check_targets:
        check_scored_targets(targets_flat, c.shape[0], ignore_index, shift_period)
    if e2d.shape[0] == 0:
        return e2d.new_zeros((0,), dtype=torch.float32), e2d.new_zeros((0,), dtype=torch.float32)
    with autocast_off(e2d.device):
        return get_backend(backend).forward(e2d, c, bias, targets_flat,
                                            _spec(ignore_index, softcap, label_smoothing, shift_period))


@memory_forward.register_fake
def _memory_forward_fake(e2d, c, bias, targets_flat, *args):
    n = e2d.shape[0]
    return e2d.new_empty((n,), dtype=torch.float32), e2d.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("cce_patch::memory_backward", mutates_args=())
def memory_backward(
    e2d: Tensor, c: Tensor, bias: Tensor | None, targets_flat: Tensor, lse: Tensor, grad_loss: Tensor,
    grad_lse: Tensor | None, ignore_index: int, softcap: float | None, label_smoothing: float, shift_period: int,
    backend: str, need_e: bool, need_c: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dE, dC, dbias) for per-row upstream gradients, placeholders where not needed."""
    needs = (need_e, need_c, need_bias and bias is not None)
    if e2d.shape[0] == 0:
        grads = (torch.zeros_like(e2d) if needs[0] else None, torch.zeros_like(c) if needs[1] else None,
                 torch.zeros_like(bias) if needs[2] else None)
    else:
        with torch.no_grad(), autocast_off(e2d.device):
            grads = get_backend(backend).backward(
                e2d, c, bias, targets_flat, _spec(ignore_index, softcap, label_smoothing, shift_period), lse,
                grad_loss.float().contiguous(), grad_lse.float().contiguous() if grad_lse is not None else None,
                needs,
            )
    de, dc, db = grads
    return _or_placeholder(de, e2d), _or_placeholder(dc, c), _or_placeholder(db, bias if bias is not None else e2d)


@memory_backward.register_fake
def _memory_backward_fake(e2d, c, bias, targets_flat, lse, grad_loss, grad_lse, ignore_index, softcap,
                          label_smoothing, shift_period, backend, need_e, need_c, need_bias):
    return (torch.empty_like(e2d) if need_e else _placeholder(e2d), torch.empty_like(c) if need_c else _placeholder(c),
            torch.empty_like(bias) if need_bias and bias is not None else _placeholder(bias if bias is not None else e2d))


def _memory_setup_context(ctx, inputs, output):
    e2d, c, bias, targets_flat, ignore_index, softcap, label_smoothing, shift_period, backend, _, lse_has_grad = inputs
    ctx.save_for_backward(e2d, c, bias, targets_flat, output[1])
    ctx.spec_args = (ignore_index, softcap, label_smoothing, shift_period)
    ctx.backend, ctx.lse_has_grad = backend, lse_has_grad


def _memory_autograd(ctx, grad_loss, grad_lse):
    e2d, c, bias, targets_flat, lse = ctx.saved_tensors
    need_e, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    rest = (None,) * 8
    if not (need_e or need_c or need_bias):
        return None, None, None, *rest
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    de, dc, db = memory_backward(
        e2d, c, bias, targets_flat, lse, grad_loss, grad_lse if ctx.lse_has_grad else None, *ctx.spec_args,
        ctx.backend, need_e, need_c, need_bias,
    )
    return de if need_e else None, dc if need_c else None, db if need_bias else None, *rest


memory_forward.register_autograd(_memory_autograd, setup_context=_memory_setup_context)


# ----------------------------------------------------------------------------------------------------- speed


@torch.library.custom_op("cce_patch::speed_forward", mutates_args=(), tags=_SYNCS)
def speed_forward(
    e2d: Tensor, c: Tensor, bias: Tensor | None, targets_flat: Tensor, ignore_index: int, softcap: float | None,
    label_smoothing: float, shift_period: int, backend: str, mean: bool, need_e: bool, need_c: bool,
    need_bias: bool, chunk_bytes: int | None, check_targets: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scalar fp32 loss, dE, dC, dbias) of the weighted sum of the counted rows (``mean``: 1/n_valid)."""
    if check_targets:
        check_scored_targets(targets_flat, c.shape[0], ignore_index, shift_period)
    be = get_backend(backend)
    spec = _spec(ignore_index, softcap, label_smoothing, shift_period)
    needs = (need_e, need_c, need_bias and bias is not None)
    chunk_rows = be.speed_plan(e2d.shape[0], e2d.shape[1], c.shape[0], e2d.dtype, chunk_bytes).rows
    with torch.no_grad(), autocast_off(e2d.device):
        loss_rows, lse, de, dc, db, in_range, weight = be.forward_with_grads(
            e2d, c, bias, targets_flat, spec, mean, needs, chunk_rows)
        if in_range is not None and not bool(in_range):  # as SpeedModeFunction's fallback, in one go
            del de, dc, db
            loss_rows, lse = be.forward(e2d, c, bias, targets_flat, spec)
            row_grad = valid_rows(targets_flat, spec).float() * weight
            de, dc, db = be.backward(e2d, c, bias, targets_flat, spec, lse, row_grad, None, needs)
        loss = loss_rows.sum() * weight
    return loss, _or_placeholder(de, e2d), _or_placeholder(dc, c), _or_placeholder(db, bias if bias is not None else e2d)


@speed_forward.register_fake
def _speed_forward_fake(e2d, c, bias, targets_flat, ignore_index, softcap, label_smoothing, shift_period, backend,
                        mean, need_e, need_c, need_bias, chunk_bytes, check_targets):
    loss = e2d.new_empty((), dtype=torch.float32)
    return (loss, torch.empty_like(e2d) if need_e else _placeholder(e2d),
            torch.empty_like(c) if need_c else _placeholder(c),
            torch.empty_like(bias) if need_bias and bias is not None else _placeholder(bias if bias is not None else e2d))


def _speed_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.needs = (inputs[10], inputs[11], inputs[12] and inputs[2] is not None)


def _speed_autograd(ctx, grad, *_unused):
    de, dc, db = ctx.saved_tensors
    rest = (None,) * 12
    if grad is None:
        return None, None, None, *rest
    need_e, need_c, need_bias = ctx.needs
    return (de * grad if need_e else None, dc * grad if need_c else None, db * grad if need_bias else None, *rest)


speed_forward.register_autograd(_speed_autograd, setup_context=_speed_setup_context)


# -------------------------------------------------------------------------------------------- what api calls


def memory_rows(e2d: Tensor, c: Tensor, bias: Tensor | None, targets_flat: Tensor, spec: LossSpec, backend: str,
                check_targets: bool, return_lse: bool) -> tuple[Tensor, Tensor]:
    """(loss_rows, lse_rows) through ``memory_forward``: the compiled counterpart of MemoryModeFunction."""
    return memory_forward(e2d, c, bias, targets_flat, spec.ignore_index, spec.softcap, spec.label_smoothing,
                          spec.shift_period, backend, check_targets, return_lse)


def speed_loss(e2d: Tensor, c: Tensor, bias: Tensor | None, targets_flat: Tensor, spec: LossSpec, backend: str,
               reduction: str, chunk_bytes: int | None, check_targets: bool) -> Tensor:
    """The scalar loss through ``speed_forward``: the compiled counterpart of SpeedModeFunction."""
    loss, *_ = speed_forward(
        e2d, c, bias, targets_flat, spec.ignore_index, spec.softcap, spec.label_smoothing, spec.shift_period,
        backend, reduction == "mean", e2d.requires_grad, c.requires_grad, bias is not None and bias.requires_grad,
        chunk_bytes, check_targets,
    )
    return loss
