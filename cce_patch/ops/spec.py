"""The loss being computed, as plain data and row math shared by every backend.

Per row i with logits z_i = softcap(e_i @ c.T + bias) and target t_i, each backend computes

    lse_i  = log sum_j exp(z_ij)
    loss_i = lse_i - (1 - a) * z_{i,t_i} - (a / V) * sum_j z_ij        (a = label_smoothing)

and 0 for ignored rows (target == ignore_index, or the last row of a sequence when shifting). The gradient
with respect to z_ij, for an upstream gradient g_i on loss_i and h_i on lse_i, is

    dz_ij = g_i * (p_ij - (1 - a) * [j == t_i] - a / V) + h_i * p_ij,    p_ij = exp(z_ij - lse_i)

and softcap multiplies it by 1 - (z_ij / softcap)^2. Reductions (mean/sum/none) are applied outside the
backends on the (N,) per-row losses, so each backend implements exactly one forward and one backward.

Which rows count, and with which target, is decided here once (``row_targets``, ``effective_targets``,
``valid_rows``): the torch path, the Triton launchers and the reductions all read the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSpec:
    ignore_index: int = -100
    softcap: float | None = None
    label_smoothing: float = 0.0
    shift_period: int = 0  # 0: no shift; T: row i scores target i+1 and rows with i % T == T-1 are ignored


def row_targets(targets_flat: torch.Tensor, start: int, stop: int, shift_period: int) -> torch.Tensor:
    """int64 targets of rows [start, stop) after the causal shift; rows that end a sequence get -1 (never a
    class). Nothing is copied beyond the slice."""
    if not shift_period:
        return targets_flat[start:stop].long()
    n = targets_flat.numel()
    idx = torch.arange(start + 1, stop + 1, device=targets_flat.device)
    out = targets_flat[idx.clamp_max(n - 1)].long()
    return torch.where(idx % shift_period == 0, torch.full_like(out, -1), out)


def valid_rows(targets_flat: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N,) bool mask of rows that contribute to the loss."""
    t = row_targets(targets_flat, 0, targets_flat.numel(), spec.shift_period)
    return (t != spec.ignore_index) & (t >= 0)


def effective_targets(targets_flat: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N,) int64 target of each row after the causal shift, ``ignore_index`` where the row does not count.

    Paths that slice rows into chunks whose boundaries need not fall on sequence boundaries (speed mode, the
    memory mode's row groups) apply the shift up front: every chunk is then an unshifted problem
    (``shift_period=0``)."""
    t = row_targets(targets_flat, 0, targets_flat.numel(), spec.shift_period)
    valid = (t != spec.ignore_index) & (t >= 0)
    return torch.where(valid, t, torch.full_like(t, spec.ignore_index))


def loss_weight(valid: torch.Tensor, mean: bool) -> torch.Tensor:
    """The loss weight of a counted row as a 0-dim device tensor (no host sync): 1/n_valid (``mean``; 1 when
    nothing counts, so an all-ignored batch gives 0, not NaN) or 1."""
    ones = torch.ones((), dtype=torch.float32, device=valid.device)
    return ones / valid.sum().clamp_min(1) if mean else ones


def flat_operands(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(e as N x D rows, c, targets as one row of N, bias)`` in the dense row-major layout every backend
    indexes (the Triton kernels take a row stride of D and unit column strides). Views where the inputs already
    are laid out so; a copy only of an input that is not (a transposed head, a hidden state sliced along D)."""
    d = e.shape[-1]
    e2d = e.reshape(-1, d)
    if e2d.stride(-1) != 1 or (e2d.shape[0] > 1 and e2d.stride(0) != d):
        e2d = e2d.contiguous()
    c = c if c.is_contiguous() else c.contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    return e2d, c, targets.reshape(-1).contiguous(), bias
