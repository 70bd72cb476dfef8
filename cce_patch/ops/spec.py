"""The loss being computed, as plain data shared by every backend.

Per row i with logits z_i = softcap(e_i @ c.T + bias) and target t_i, each backend computes

    lse_i  = log sum_j exp(z_ij)
    loss_i = lse_i - (1 - a) * z_{i,t_i} - (a / V) * sum_j z_ij        (a = label_smoothing)

and 0 for ignored rows (target == ignore_index, or the last row of a sequence when shifting). The gradient
with respect to z_ij, for an upstream gradient g_i on loss_i and h_i on lse_i, is

    dz_ij = g_i * (p_ij - (1 - a) * [j == t_i] - a / V) + h_i * p_ij,    p_ij = exp(z_ij - lse_i)

and softcap multiplies it by 1 - (z_ij / softcap)^2. Reductions (mean/sum/none) are applied outside the
backends on the (N,) per-row losses, so each backend implements exactly one forward and one backward.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    ignore_index: int = -100
    softcap: float | None = None
    label_smoothing: float = 0.0
    shift_period: int = 0  # 0: no shift; T: row i scores target i+1 and rows with i % T == T-1 are ignored
