"""Autograd for ``mode="memory"``: the forward keeps per-row statistics only, the backward recomputes logits.

The forward saves the inputs and the (N,) per-row log-sum-exp; the backward hands the backend the per-row
upstream gradients of the loss and of the LSE, and the backend recomputes the logits chunk by chunk to form
the exact gradients (or, with a gradient filter, ``filtering.py``, the filtered ones: the filter is handed to
the backend only when there is one, so a backend without filtering is never called with it). Memory above
the inputs: one logit-gradient chunk plus fp32 accumulators.

The backend runs with autocast off (``autocast.py``: the op accumulates in fp32 whatever autocast is on), and
under ``create_graph=True`` its gradients refuse a second differentiation (``second_order.py``).
"""

from __future__ import annotations

import torch

from .autocast import autocast_off
from .backends import Backend
from .filtering import GradFilter
from .second_order import guard_second_order
from .spec import LossSpec


class MemoryModeFunction(torch.autograd.Function):
    """(loss_rows, lse_rows) of flattened rows; gradients by recomputation in the backend's ``backward``."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, backend: Backend,
                grad_filter: GradFilter | None = None):
        ctx.set_materialize_grads(False)
        tile_stats = None  # what a backend's filter decides from (Backend.filter_forward), if it needs any
        if e2d.shape[0] == 0:
            loss = torch.zeros(0, dtype=torch.float32, device=e2d.device)
            lse = torch.zeros(0, dtype=torch.float32, device=e2d.device)
        else:
            with autocast_off(e2d.device):
                if grad_filter is not None and backend.filter_forward is not None:
                    loss, lse, tile_stats = backend.filter_forward(e2d, c, bias, targets_flat, spec)
                else:
                    loss, lse = backend.forward(e2d, c, bias, targets_flat, spec)
        ctx.save_for_backward(e2d, c, bias, targets_flat, lse, tile_stats)
        ctx.spec, ctx.backend, ctx.filter = spec, backend, grad_filter
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        e2d, c, bias, targets_flat, lse, tile_stats = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not any(needs):
            return None, None, None, None, None, None, None
        if e2d.shape[0] == 0 or (grad_loss is None and grad_lse is None):
            def zero(t, need):
                return torch.zeros_like(t) if need else None

            grads = zero(e2d, needs[0]), zero(c, needs[1]), zero(bias, needs[2]) if bias is not None else None
            return *guard_second_order(grads), None, None, None, None
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        filtered = {} if ctx.filter is None else {"grad_filter": ctx.filter}
        if tile_stats is not None:
            filtered["tile_stats"] = tile_stats
        with torch.no_grad(), autocast_off(e2d.device):
            grads = ctx.backend.backward(
                e2d, c, bias, targets_flat, ctx.spec, lse,
                grad_loss.float().contiguous(),
                grad_lse.float().contiguous() if grad_lse is not None else None,
                needs, **filtered,
            )
        return *guard_second_order(grads), None, None, None, None
