"""Double backward: refused with a clear error, never a silently wrong second derivative.

The backends compute gradients with kernels that have no derivative of their own. Returning those gradients
from a backward that runs with ``create_graph=True`` as plain tensors would make every second-order term
through the op silently zero (a gradient penalty, a Hessian-vector product, MAML), and letting autograd
trace the torch path's backward would give a partial, wrong graph. So under ``create_graph=True`` the
gradients come back attached to a node whose backward raises: a first-order use of them works, and
differentiating through them raises :class:`DoubleBackwardError` saying why. (``torch.autograd.function.
once_differentiable`` only does this when the incoming gradient itself requires grad, which
``loss.backward(create_graph=True)``'s does not, so it is not enough here.)
"""

from __future__ import annotations

import torch

MESSAGE = (
    "linear_cross_entropy does not support double backward (a derivative of its gradients, e.g. after "
    "backward(create_graph=True) or torch.autograd.grad(..., create_graph=True)): its gradients come from fused "
    "kernels with no derivative of their own. Compute the second-order term from explicit logits instead "
    "(F.linear + F.cross_entropy), or unpatch the model for that loss."
)


class DoubleBackwardError(RuntimeError):
    """A derivative of ``linear_cross_entropy``'s gradients was requested."""


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the gradients; differentiating its outputs raises."""

    @staticmethod
    def forward(ctx, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise DoubleBackwardError(MESSAGE)


def guard_second_order(grads: tuple) -> tuple:
    """``grads`` (tensors or None) as a backward should return them: unchanged normally, and under
    ``create_graph=True`` (grad mode on inside a backward) attached to a node that refuses differentiation."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    # the node needs inputs that require grad to be part of the graph: detached aliases, as
    # once_differentiable does
    guarded = _RaiseOnBackward.apply(*(grads[i].detach().requires_grad_() for i in present))
    out = list(grads)
    for i, g in zip(present, guarded, strict=True):
        out[i] = g
    return tuple(out)
