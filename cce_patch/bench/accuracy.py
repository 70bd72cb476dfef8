"""fp32 ground truth (loss and gradients) for the error columns, chunked over tokens so it always fits.

Why chunked: at the paper's shape the fp32 logits alone are 8 GB and at N=65536 they are 67 GB. Rows are taken
``chunk`` at a time: logits -> softmax - onehot -> dE rows and a dC accumulation, all in true fp32 (TF32 off),
so the ground truth is ~1e-6 accurate and costs a few fp32 GEMMs of N x D x V.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class GroundTruth:
    loss: float
    de: torch.Tensor  # (N, D) fp32, gradient of the mean loss
    dc: torch.Tensor  # (V, D) fp32


@contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def fp32_ground_truth(
    e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, *, chunk_bytes: int = 2 * 1024**3
) -> GroundTruth:
    """Mean cross-entropy of ``e @ c.T`` vs ``t`` and its gradients w.r.t. ``e`` and ``c``, in fp32."""
    n, v = e.shape[0], c.shape[0]
    rows = max(1, min(n, chunk_bytes // (4 * v)))
    c32 = c.float()
    de = torch.empty(n, e.shape[1], dtype=torch.float32, device=e.device)
    dc = torch.zeros_like(c32)
    loss_sum = torch.zeros((), dtype=torch.float64, device=e.device)
    with _no_tf32():
        for s in range(0, n, rows):
            e32 = e[s : s + rows].float()
            ts = t[s : s + rows]
            logits = e32 @ c32.T
            lse = torch.logsumexp(logits, dim=-1)
            loss_sum += (lse - logits.gather(1, ts[:, None]).squeeze(1)).double().sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(probs.shape[0], device=e.device), ts] -= 1.0
            probs /= n  # d(mean loss)/d(logits)
            de[s : s + rows] = probs @ c32
            dc.addmm_(probs.T, e32)
            del logits, probs
    return GroundTruth(loss=float(loss_sum / n), de=de, dc=dc)


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """‖g − ref‖ / ‖ref‖, computed in fp32 on the device (fp64 would double the memory of dC)."""
    return float((g.float() - ref).norm() / ref.norm())
