"""Per-token statistics of the next-token distribution: which ones, their math, and how they are scaled.

``linear_log_probs`` (``token_stats.py``) returns, per row i with target t_i, from the logits

    y_ij = s * (e_i . c_j + b_j)                      s: the model's logit scale (Cohere, Granite), 1 by default
    z_ij = softcap(y_ij) / tau                        softcap(y) = k * tanh(y / k) when capped; tau: temperature
    lse_i = log sum_j exp(z_ij),  p_ij = exp(z_ij - lse_i)

these quantities (fp32, shape of the targets, 0 / False on ignored rows):

    log_probs_i        = z_{i,t_i} - lse_i                   (= -cross-entropy; differentiable)
    entropy_i          = -sum_j p_ij log p_ij                (differentiable)
    log_sum_sq_probs_i = log sum_j p_ij^2                    (= log of the collision probability; no gradient)
    mean_logits_i      = (1/V) sum_j z_ij                    (the tempered logits' mean; no gradient)
    is_top1_i          = t_i == argmax_j z_ij                (the first maximum, as torch.argmax; no gradient)

The order scale -> softcap -> temperature is TRL's fused LM head's (``trl.kernels.chunked_logprob``) and the
model's own (its forward scales and caps the logits; generation and RL trainers divide by the temperature).
Both backends fold the scale and the temperature into one factor applied to the fp32 products, and the
temperature into the cap: softcap_k(y) / tau = softcap_{k/tau}(y / tau), so

    z_ij = softcap_{k/tau}(alpha * (e_i . c_j + b_j)),   alpha = s / tau

which is the loss path's logit tile with one extra fp32 multiply (``StatsSpec.logit_scale`` = alpha and
``LossSpec.softcap`` = k / tau). Nothing is rounded to the input dtype on the way: the logits stay fp32.

Gradients with respect to z_ij, for upstream gradients a_i on log_probs_i and h_i on entropy_i:

    d/dz_ij = a_i ([j == t_i] - p_ij) - h_i p_ij (log p_ij + entropy_i)

In the backends' terms (``spec.py``'s g on the loss, h on the LSE, plus one new per-row coefficient r on
p log p): g = -a, h_lse = -h * entropy, r = -h, i.e. ``dz = g (p - onehot) + h_lse p + r p (z - lse)``, then
times the softcap derivative 1 - (z / k')^2 and alpha, on the way back to e . c + b.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The per-token fields ``linear_log_probs`` can compute, in the order of ``TokenStats``; ``log_probs`` is
#: always computed. The names are TRL's ``FusedCausalLMOutput`` fields.
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics a call computes beyond the log-probabilities, and the fp32 factor ``logit_scale``
    (alpha = scale / temperature) applied to every product ``e . c + b`` before the soft cap."""

    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False
    logit_scale: float = 1.0

    @classmethod
    def from_outputs(cls, outputs: tuple[str, ...], logit_scale: float = 1.0) -> StatsSpec:
        return cls(**{name: name in outputs for name in OUTPUTS[1:]}, logit_scale=float(logit_scale))

    @property
    def scaled(self) -> bool:
        return self.logit_scale != 1.0

    @property
    def extras(self) -> bool:
        """Whether anything beyond log-probs (and so beyond the loss kernel's statistics) is asked for."""
        return self.entropy or self.log_sum_sq_probs or self.mean_logits or self.is_top1
