"""Autograd for ``mode="speed"``: the gradients are formed in the forward pass and handed out in backward.

Why a separate Function: with a scalar loss (mean or sum) the upstream gradient of row i is g * w_i, where
w_i is known in the forward (1/n_valid or 1 on counted rows, 0 elsewhere) and only the scalar g arrives in
backward. Forming w-weighted gradients while the logits exist avoids recomputing them (a whole GEMM of
N x D x V); backward multiplies by g when g != 1. The price is memory for one chunk of the logit gradient
(``chunk_bytes``), held only inside the forward, plus holding dE/dC from the forward to the backward.

If the Triton path reports a row outside its range (a loss above ``ANCHOR_MARGIN + SPEED_RANGE`` = 104 nats,
see ``fused/speed_mode.py``), the forward is redone the plain way, the precomputed gradients are dropped and
backward runs the recompute path instead: same result, slower. The same host sync reads the target check of a
Triton call (``validation.scored_targets_ok``), so the call syncs once, after its kernels are queued, not before.

With a gradient filter (``filtering.py``) the backend filters the gradients it forms; the filter is handed to
it only when there is one, as in memory mode. If such a call falls back to the recompute path, that path filters
only on a backend whose memory mode does (the torch path); the Triton backend's recompute forms the exact
gradients, which are within any filter's bound (the counter keeps what the discarded forward decided).

As in memory mode, the backend runs with autocast off and gradients handed out under ``create_graph=True``
refuse a second differentiation (``second_order.py``).
"""

from __future__ import annotations

import torch

from .autocast import autocast_off
from .backends import MEMORY_FILTERING_BACKENDS, Backend
from .filtering import GradFilter
from .second_order import guard_second_order
from .spec import LossSpec, valid_rows
from .validation import raise_bad_targets


def read_flags(*flags: torch.Tensor | None) -> list[bool]:
    """The values of 0-dim bool tensors, read in one host sync (None reads as True)."""
    given = [f for f in flags if f is not None]
    values = iter(torch.stack(given).tolist() if given else [])
    return [True if f is None else bool(next(values)) for f in flags]


class SpeedModeFunction(torch.autograd.Function):
    """Scalar loss (``reduction`` "mean" or "sum") whose gradients are computed during forward."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, backend: Backend, reduction: str,
                chunk_bytes: int | None, grad_filter: GradFilter | None = None,
                targets_ok: torch.Tensor | None = None):
        ctx.set_materialize_grads(False)
        needs = (e2d.requires_grad, c.requires_grad, bias is not None and bias.requires_grad)
        chunk_rows = backend.speed_plan(e2d.shape[0], e2d.shape[1], c.shape[0], e2d.dtype, chunk_bytes).rows
        filtered = {} if grad_filter is None else {"grad_filter": grad_filter}
        with autocast_off(e2d.device):
            loss_rows, lse, de, dc, db, in_range, weight = backend.forward_with_grads(
                e2d, c, bias, targets_flat, spec, reduction == "mean", needs, chunk_rows, **filtered)
            loss = loss_rows.sum() * weight  # queued before the sync below, so the GPU has it done by then
        # The recompute below filters only on a backend whose memory mode does; elsewhere (Triton) it forms the
        # exact gradients, which are within any filter's bound.
        ctx.filtered = filtered if backend.name in MEMORY_FILTERING_BACKENDS else {}
        ctx.spec, ctx.needs, ctx.backend, ctx.weight = spec, needs, backend, weight
        rows_in_range, targets_in_range = read_flags(in_range, targets_ok)  # the call's one host sync
        if not targets_in_range:  # checked late (api.py): raise before returning anything
            raise_bad_targets(targets_flat, c.shape[0], spec.ignore_index, spec.shift_period)
        ctx.fallback = not rows_in_range
        if ctx.fallback:  # some row is outside the stored range: drop everything, redo it the memory-mode way
            del de, dc, db
            with autocast_off(e2d.device):
                loss_rows, lse = backend.forward(e2d, c, bias, targets_flat, spec)
            ctx.grads = None
            loss = loss_rows.sum() * weight
        else:
            ctx.grads = (de, dc, db)
        # The inputs and the (N,) LSE cost nothing to keep: a second backward through this call
        # (retain_graph=True) recomputes the gradients as memory mode does, instead of failing.
        ctx.save_for_backward(e2d, c, bias, targets_flat, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None, None, None, None, None, None
        if ctx.grads is None:  # out of range, or the precomputed gradients were handed out already
            e2d, c, bias, targets_flat, lse = ctx.saved_tensors
            with torch.no_grad(), autocast_off(e2d.device):
                row_grad = valid_rows(targets_flat, ctx.spec).float() * (grad.float() * ctx.weight)  # (N,) fp32
                grads = ctx.backend.backward(e2d, c, bias, targets_flat, ctx.spec, lse, row_grad, None, ctx.needs,
                                             **ctx.filtered)
        else:
            grads, ctx.grads = ctx.grads, None  # release them as soon as autograd takes them
            if float(grad) != 1.0:  # the common loss.backward() needs no extra pass over dC
                with torch.no_grad():
                    grads = tuple(g.mul_(grad) if g is not None else None for g in grads)
        return *guard_second_order(grads), None, None, None, None, None, None, None
