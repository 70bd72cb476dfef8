"""Pure-PyTorch implementation: the CPU path, and an independent second implementation of the math.

It follows ``spec.LossSpec`` exactly, in fp32, processing a chunk of rows at a time so that at most
``chunk_rows x V`` logits exist at once (never the full ``N x V`` matrix). The backward pass recomputes each
chunk's logits from ``e``, ``c`` and the saved log-sum-exp, as the fused kernels do.
"""

from __future__ import annotations

import torch

from .spec import LossSpec

#: fp32 logits per chunk: 64 MiB keeps the CPU path cache-friendly and bounded at any vocabulary size.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


def chunk_rows_for(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of fp32 logits (plus its softmax) fits ``chunk_bytes``."""
    return max(1, chunk_bytes // (vocab * 4 * 2))


def _row_targets(targets_flat: torch.Tensor, start: int, stop: int, shift_period: int) -> torch.Tensor:
    """Targets of rows [start, stop); rows that end a sequence under shifting get -1 (never a class)."""
    if not shift_period:
        return targets_flat[start:stop].long()
    n = targets_flat.numel()
    idx = torch.arange(start + 1, stop + 1, device=targets_flat.device)
    out = targets_flat[idx.clamp_max(n - 1)].long()
    return torch.where(idx % shift_period == 0, torch.full_like(out, -1), out)


def valid_rows(targets_flat: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N,) bool mask of rows that contribute to the loss."""
    t = _row_targets(targets_flat, 0, targets_flat.numel(), spec.shift_period)
    return (t != spec.ignore_index) & (t >= 0)


class _Chunk:
    """Logits of one chunk of rows in fp32, with everything the forward and backward need from them."""

    def __init__(self, e2d, c32, b32, targets_flat, spec: LossSpec, start: int, stop: int):
        e = e2d[start:stop].float()
        s = e @ c32.T
        if b32 is not None:
            s = s + b32
        if spec.softcap is not None:
            s = spec.softcap * torch.tanh(s / spec.softcap)
        self.e = e
        self.z = s
        t = _row_targets(targets_flat, start, stop, spec.shift_period)
        self.valid = (t != spec.ignore_index) & (t >= 0)
        self.t = torch.where(self.valid, t, torch.zeros_like(t))


def torch_forward(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse), both fp32 (N,), zero on ignored rows."""
    n, v = e2d.shape[0], c.shape[0]
    c32 = c.float()
    b32 = bias.float() if bias is not None else None
    step = chunk_rows or chunk_rows_for(v)
    loss = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    lse = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    a = spec.label_smoothing
    for start in range(0, n, step):
        stop = min(n, start + step)
        ch = _Chunk(e2d, c32, b32, targets_flat, spec, start, stop)
        l = torch.logsumexp(ch.z, dim=-1)
        zt = ch.z.gather(1, ch.t[:, None]).squeeze(1)
        row = l - (1.0 - a) * zt
        if a:
            row = row - (a / v) * ch.z.sum(-1)
        loss[start:stop] = torch.where(ch.valid, row, 0.0)
        lse[start:stop] = torch.where(ch.valid, l, 0.0)
    return loss, lse


def torch_backward(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dE, dC, dbias) for upstream per-row gradients ``grad_loss`` and ``grad_lse`` (N,) fp32."""
    need_de, need_dc, need_db = needs
    n, v = e2d.shape[0], c.shape[0]
    c32 = c.float()
    b32 = bias.float() if bias is not None else None
    step = chunk_rows or chunk_rows_for(v)
    de = torch.empty_like(e2d) if need_de else None
    dc = torch.zeros(c.shape, dtype=torch.float32, device=c.device) if need_dc else None
    db = torch.zeros(v, dtype=torch.float32, device=c.device) if need_db else None
    a = spec.label_smoothing
    for start in range(0, n, step):
        stop = min(n, start + step)
        ch = _Chunk(e2d, c32, b32, targets_flat, spec, start, stop)
        g = torch.where(ch.valid, grad_loss[start:stop].float(), 0.0)
        p = torch.exp(ch.z - lse[start:stop, None])
        dz = g[:, None] * (p - a / v)
        dz.scatter_add_(1, ch.t[:, None], -(1.0 - a) * g[:, None])
        if grad_lse is not None:
            h = torch.where(ch.valid, grad_lse[start:stop].float(), 0.0)
            dz = dz + h[:, None] * p
        if spec.softcap is not None:
            dz = dz * (1.0 - (ch.z / spec.softcap) ** 2)
        if de is not None:
            de[start:stop] = (dz @ c32).to(e2d.dtype)
        if dc is not None:
            dc += dz.T @ ch.e
        if db is not None:
            db += dz.sum(0)
    return (
        de,
        dc.to(c.dtype) if dc is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )



def torch_forward_with_grads(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    row_weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
    chunk_rows: int | None = None,
):
    """Speed mode on the torch path: the scalar loss is sum_i w_i loss_i with ``row_weight`` w known now, so
    each chunk's fp32 logits give its loss and its gradients at once (three matmuls per chunk, not four).
    Returns (loss_rows, lse_rows, dE, dC, dbias, None): the torch path has no range limit to report."""
    need_de, need_dc, need_db = needs
    n, v = e2d.shape[0], c.shape[0]
    c32 = c.float()
    b32 = bias.float() if bias is not None else None
    step = chunk_rows or chunk_rows_for(v)
    loss = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    lse = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    de = torch.empty_like(e2d) if need_de else None
    dc = torch.zeros(c.shape, dtype=torch.float32, device=c.device) if need_dc else None
    db = torch.zeros(v, dtype=torch.float32, device=c.device) if need_db else None
    a = spec.label_smoothing
    for start in range(0, n, step):
        stop = min(n, start + step)
        ch = _Chunk(e2d, c32, b32, targets_flat, spec, start, stop)
        l = torch.logsumexp(ch.z, dim=-1)
        zt = ch.z.gather(1, ch.t[:, None]).squeeze(1)
        row = l - (1.0 - a) * zt
        if a:
            row = row - (a / v) * ch.z.sum(-1)
        loss[start:stop] = torch.where(ch.valid, row, 0.0)
        lse[start:stop] = torch.where(ch.valid, l, 0.0)
        w = torch.where(ch.valid, row_weight[start:stop].float(), 0.0)
        dz = w[:, None] * (torch.exp(ch.z - l[:, None]) - a / v)
        dz.scatter_add_(1, ch.t[:, None], -(1.0 - a) * w[:, None])
        if spec.softcap is not None:
            dz = dz * (1.0 - (ch.z / spec.softcap) ** 2)
        if de is not None:
            de[start:stop] = (dz @ c32).to(e2d.dtype)
        if dc is not None:
            dc += dz.T @ ch.e
        if db is not None:
            db += dz.sum(0)
    return (
        loss, lse, de,
        dc.to(c.dtype) if dc is not None else None,
        db.to(bias.dtype) if db is not None else None,
        None,
    )
