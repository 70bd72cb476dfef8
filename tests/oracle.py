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
        return float(num.detach())
    return float((num / den).detach())


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_inputs(shape, d, v, dtype, regime="flat", bias=False, ignore_frac=0.2, device="cpu"):
    """Fresh random (e, c, targets, bias) leaves. ``peaked`` scales c by 6 (logits ~ N(0, 36))."""
    e = torch.randn(*shape, d, device=device) / d**0.25
    scale = 6.0 if regime == "peaked" else 1.0
    c = scale * torch.randn(v, d, device=device) / d**0.25
    t = torch.randint(0, v, shape, device=device)
    t[torch.rand(shape, device=device) < ignore_frac] = -100
    b = torch.randn(v, device=device) if bias else None
    e, c = e.to(dtype).requires_grad_(), c.to(dtype).requires_grad_()
    if b is not None:
        b = b.to(dtype).requires_grad_()
    return e, c, t, b


def check_against_oracle(op, e, c, t, b, tol, *, return_lse=False, **kw):
    """Run ``op`` (a linear_cross_entropy partial) and the fp64 oracle under the same random upstream
    gradient (plus a z-loss term when ``return_lse``); assert loss, LSE and every gradient agree."""
    out = op(e, c, t, bias=b, return_lse=return_lse, **kw)
    loss, lse = out if return_lse else (out, None)
    assert loss.dtype == torch.float32
    ref, ref_lse, (e64, c64, b64) = dense_reference(e, c, t, bias=b, **kw)
    weight = torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
    objective = (loss.double() * weight).sum()
    ref_objective = (ref * weight).sum()
    if return_lse:
        objective = objective + 0.1 * (lse.double() ** 2).sum()
        ref_objective = ref_objective + 0.1 * (ref_lse**2).sum()
        assert rel_err(lse.detach(), ref_lse.detach()) < tol
    objective.backward()
    ref_objective.backward()
    errors = {"loss": rel_err(loss.detach(), ref.detach())}
    for name, got, want in (("e", e, e64), ("c", c, c64), ("bias", b, b64)):
        if got is not None and got.requires_grad:
            errors[name] = rel_err(got.grad, want.grad)
    # Written so that NaN fails: max() over a NaN and a number can return the number.
    assert all(err < tol for err in errors.values()), errors
    return errors
