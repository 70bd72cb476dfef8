"""Autograd for ``mode="speed"``: the gradients are formed in the forward pass and handed out in backward.

Why a separate Function: with a scalar loss (mean or sum) the upstream gradient of row i is g * w_i, where
w_i is known in the forward (1/n_valid or 1 on counted rows, 0 elsewhere) and only the scalar g arrives in
backward. Forming w-weighted gradients while the logits exist avoids recomputing them (a whole GEMM of
N x D x V); backward multiplies by g when g != 1. The price is memory for one chunk of the logit gradient
(``chunk_bytes``), held only inside the forward, plus holding dE/dC from the forward to the backward.

If the Triton path reports a row outside its range (a loss above ``MREF_MARGIN + SPEED_RANGE`` = 104 nats, see
``triton_speed.py``), the forward is redone the plain way, the precomputed gradients are dropped and backward
runs the recompute path instead: same result, slower.
"""

from __future__ import annotations

import torch

from .reference import (
    chunk_rows_for,
    loss_weight,
    torch_backward,
    torch_forward,
    torch_forward_with_grads,
    valid_rows,
)
from .spec import LossSpec

#: Default byte budget for one chunk of the unnormalised probabilities q (rows x V, input dtype). 2 GiB
#: lets the paper shape (N=8192, V=256000, bf16) run in 2 chunks of 4096 rows: large GEMMs, and peak
#: memory ~3.4 GB above the inputs (torch.compile of the plain loss: ~5.4 GB).
SPEED_CHUNK_BYTES = 2 * 1024**3


def _speed_backend(impl: str):
    """(forward_with_grads, plain forward, recompute backward, rows per chunk) of a backend."""
    if impl == "torch":
        return (_torch_forward_with_grads, torch_forward, torch_backward,
                lambda n, v, dtype, budget: chunk_rows_for(v, budget))
    from . import triton_backend, triton_speed  # lazy: importing triton is slow

    return (triton_speed.triton_forward_with_grads, triton_backend.triton_forward, triton_backend.triton_backward,
            triton_speed.default_chunk_rows)


def _torch_forward_with_grads(e2d, c, bias, targets_flat, spec, mean, needs, chunk_rows):
    valid = valid_rows(targets_flat, spec)
    weight = loss_weight(valid, mean)
    out = torch_forward_with_grads(e2d, c, bias, targets_flat, spec, valid.float() * weight, needs, chunk_rows)
    return (*out, weight)


class SpeedModeFunction(torch.autograd.Function):
    """Scalar loss (``reduction`` "mean" or "sum") whose gradients are computed during forward."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, impl: str, reduction: str, chunk_bytes: int):
        ctx.set_materialize_grads(False)
        needs = (e2d.requires_grad, c.requires_grad, bias is not None and bias.requires_grad)
        with_grads, plain_forward, recompute_backward, rows_fn = _speed_backend(impl)
        chunk_rows = rows_fn(e2d.shape[0], c.shape[0], e2d.dtype, chunk_bytes)
        loss_rows, lse, de, dc, db, in_range, weight = with_grads(
            e2d, c, bias, targets_flat, spec, reduction == "mean", needs, chunk_rows)
        loss = loss_rows.sum() * weight  # queued before the sync below, so the GPU has it done by then
        ctx.spec, ctx.needs, ctx.backward_fn = spec, needs, recompute_backward
        ctx.fallback = in_range is not None and not bool(in_range)  # one host sync per call
        if ctx.fallback:  # some row is outside the stored range: drop everything, redo it the memory-mode way
            del de, dc, db
            loss_rows, lse = plain_forward(e2d, c, bias, targets_flat, spec)
            ctx.save_for_backward(e2d, c, bias, targets_flat, lse)
            ctx.weight, ctx.grads = weight, None
            loss = loss_rows.sum() * weight
        else:
            ctx.grads = (de, dc, db)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None, None, None, None
        if ctx.fallback:
            e2d, c, bias, targets_flat, lse = ctx.saved_tensors
            row_grad = valid_rows(targets_flat, ctx.spec).float() * (grad.float() * ctx.weight)  # (N,) fp32
            grads = ctx.backward_fn(e2d, c, bias, targets_flat, ctx.spec, lse, row_grad, None, ctx.needs)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy(mode='speed') hands out its precomputed gradients once; a second "
                    "backward through the same call (retain_graph=True) needs mode='memory'"
                )
            grads, ctx.grads = ctx.grads, None  # release them as soon as autograd takes them
            if float(grad) != 1.0:  # the common loss.backward() needs no extra pass over dC
                grads = tuple(g.mul_(grad) if g is not None else None for g in grads)
        de, dc, db = grads
        return de, dc, db, None, None, None, None, None
