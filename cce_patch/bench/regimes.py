"""Synthetic inputs ``(e, c, targets)`` for linear+CE benchmarks, in three logit regimes.

Why three: a fused kernel's speed can depend on the logits it sees. Gradient filtering (skipping blocks whose
softmax values are tiny) is fast on flat or trained-LM-like logits and slow on peaked ones; exactness suffers
most on LM-like logits. A benchmark that shows one regime hides both effects.

- ``flat``: an untrained head. Logits ~ N(0, 1), softmax close to uniform (entropy ~ log V).
- ``peaked``: logits ~ N(0, 36): each row's mass sits on a few random columns (low entropy, but on
  columns that differ per row, so no block of the vocabulary is skippable for all rows).
- ``lm``: trained-LM-like: Zipf(1.1) target frequencies scattered over the vocabulary, a shared "frequency"
  direction in the classifier, and hidden states close to their target's row (high target probability).

The draws follow the project's shared anchor generator exactly (same distributions, same seeded
``torch.Generator`` created on the target device, same order of calls), so inputs made here on a CUDA device
are bit-identical to the ones the published peer numbers were measured on, and numbers compare.
"""

from __future__ import annotations

import torch

REGIMES = ("flat", "peaked", "lm")


def _flat(n: int, d: int, v: int, dev: torch.device, g: torch.Generator, scale_c: float):
    e = torch.randn(n, d, device=dev, generator=g) / d**0.25
    c = scale_c * torch.randn(v, d, device=dev, generator=g) / d**0.25
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    return e, c, t


def _lm(n: int, d: int, v: int, dev: torch.device, g: torch.Generator):
    # Zipf(1.1) over ranks; a random permutation scatters the frequent ids over the vocabulary.
    p = torch.arange(1, v + 1, device=dev, dtype=torch.float32) ** -1.1
    p /= p.sum()
    perm = torch.randperm(v, device=dev, generator=g)
    t = perm[torch.multinomial(p, n, replacement=True, generator=g)]
    c = torch.randn(v, d, device=dev, generator=g) / d**0.5  # rows of norm ~1
    u = torch.randn(d, device=dev, generator=g)
    u /= u.norm()
    # A "frequency direction" u: frequent tokens get a larger logit for every hidden state leaning on u.
    log_freq = torch.empty(v, device=dev)
    log_freq[perm] = torch.log(p * v)
    c += (0.5 * log_freq).unsqueeze(1) * u
    # Hidden states: close to their target's classifier row, plus noise, plus the frequency direction.
    e = 10 * c[t] + 2 * torch.randn(n, d, device=dev, generator=g) / d**0.5 + 2 * u
    return e, c, t


def make_inputs(
    regime: str,
    n: int,
    d: int,
    v: int,
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return contiguous ``e (n, d)``, ``c (v, d)`` in ``dtype`` and int64 ``targets (n,)`` for ``regime``.

    All arithmetic is done in fp32 on ``device`` and cast at the end, so the result depends only on
    (regime, shape, device type, seed) — not on ``dtype`` beyond the final rounding.
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    if regime == "flat":
        e, c, t = _flat(n, d, v, dev, g, 1.0)
    elif regime == "peaked":
        e, c, t = _flat(n, d, v, dev, g, 6.0)
    elif regime == "lm":
        e, c, t = _lm(n, d, v, dev, g)
    else:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    return e.to(dtype).contiguous(), c.to(dtype).contiguous(), t


@torch.no_grad()
def describe(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, rows: int = 256) -> dict[str, float]:
    """Statistics of the softmax on the first ``rows`` rows: mean target probability, fraction of entries
    above 2**-12 (what a gradient filter could not skip), and mean entropy in nats."""
    logits = e[:rows].float() @ c.float().T
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return {
        "target_prob": round(float(p.gather(1, t[:rows, None]).mean()), 3),
        "frac_above_eps": round(float((p > 2**-12).float().mean()), 6),
        "entropy": round(float(entropy.mean()), 2),
    }
