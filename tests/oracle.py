"""The fp64 oracle every implementation is compared against: explicit logits + F.cross_entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_reference(
    e, c, targets, *, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=False,
    label_smoothing=0.0, return_lse=False,
):
    """Same contract as ``cce_patch.linear_cross_entropy``, computed densely in fp64 on leaf copies.

    Returns (loss, lse or None, grads dict) where grads holds d/de, d/dc, d/dbias of ``loss.sum()`` (plus
    ``lse.sum() * 0.1`` when return_lse) for comparison with the op under the same upstream gradient.
    """
    e64 = e.detach().double().requires_grad_(True)
    c64 = c.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    t = targets.long()
    if shift:
        t = torch.cat([t[..., 1:], torch.full_like(t[..., :1], ignore_index)], dim=-1)
    logits = e64 @ c64.T
    if b64 is not None:
        logits = logits + b64
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = logits.reshape(-1, logits.shape[-1])
    tf = t.reshape(-1)
    valid = tf != ignore_index
    rows = F.cross_entropy(flat, tf, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    rows = torch.where(valid, rows, 0.0)
    lse = torch.where(valid, torch.logsumexp(flat, -1), 0.0).view(t.shape)
    if reduction == "none":
        loss = rows.view(t.shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum().clamp_min(1)
    return loss, lse, (e64, c64, b64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    den = b.norm()
    num = (a - b).norm()
    if den == 0:
        return float(num)
    return float(num / den)
