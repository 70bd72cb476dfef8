"""``linear_log_probs``: per-token log-probabilities and statistics of ``e @ c.T`` without materialising logits.

RL and preference trainers (GRPO, DPO, KTO, ...) need the log-probability of each sampled token, often its
entropy (a metric, or a differentiable bonus), and SFT logs the token accuracy; TRL's fused LM head returns
exactly these fields. This op computes them in the loss kernels' fused pass: one forward that streams the
vocabulary tile by tile and keeps a few numbers per row, and a backward that recomputes the logits chunk by
chunk (the memory mode of ``linear_cross_entropy``). The math of every field and of its gradient is in
``stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import NamedTuple

import torch

from .autocast import autocast_inputs, autocast_off
from .backends import Backend, get_backend, resolve_impl
from .options import check_softcap
from .second_order import guard_second_order
from .spec import LossSpec, flat_operands, valid_rows
from .stats import OUTPUTS, StatsSpec
from .validation import validate_inputs


class TokenStats(NamedTuple):
    """The per-token outputs of :func:`linear_log_probs`, each of the targets' shape (fp32 unless stated).

    Fields not asked for in ``outputs`` are None. Every field is 0 (False) where the row does not count
    (``ignore_index``, or the last position of a sequence under ``shift``); ``mask`` says which rows count."""

    log_probs: torch.Tensor  # log p(target); differentiable
    entropy: torch.Tensor | None  # -sum p log p; differentiable
    log_sum_sq_probs: torch.Tensor | None  # log sum p^2; no gradient
    mean_logits: torch.Tensor | None  # mean over the vocabulary of the (scaled, capped, tempered) logits; no gradient
    is_top1: torch.Tensor | None  # bool: the target is the first argmax; no gradient
    mask: torch.Tensor  # bool: the row counts


def _check_outputs(outputs: object) -> tuple[str, ...]:
    names = (outputs,) if isinstance(outputs, str) else outputs
    if not isinstance(names, Iterable):
        raise TypeError(f"outputs must be a tuple of names among {OUTPUTS}, got {outputs!r}")
    names = tuple(names)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; linear_log_probs computes {OUTPUTS}")
    return names


def _check_positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class TokenStatsFunction(torch.autograd.Function):
    """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) of flattened rows. Gradients flow from
    log_probs and entropy, recomputing the logits in the backend's ``backward`` (``stats.py``'s formula)."""

    @staticmethod
    def forward(ctx, e2d, c, bias, targets_flat, spec: LossSpec, stats: StatsSpec, backend: Backend):
        ctx.set_materialize_grads(False)  # entropy is often a metric only: no gradient, no extra backward term
        n = e2d.shape[0]
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=e2d.device)
            lp, lse = empty, empty.clone()
            ent = empty.clone() if stats.entropy else None
            lssp = empty.clone() if stats.log_sum_sq_probs else None
            mean = empty.clone() if stats.mean_logits else None
            top1 = torch.zeros(0, dtype=torch.bool, device=e2d.device) if stats.is_top1 else None
        else:
            with autocast_off(e2d.device):
                lp, lse, ent, lssp, mean, top1 = backend.stats_forward(e2d, c, bias, targets_flat, spec, stats)
        ctx.save_for_backward(e2d, c, bias, targets_flat, lse, ent if ent is not None else lse)
        ctx.spec, ctx.stats, ctx.backend = spec, stats, backend
        ctx.mark_non_differentiable(*(x for x in (lssp, mean, top1) if x is not None))
        return lp, ent, lssp, mean, top1

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, *_):
        e2d, c, bias, targets_flat, lse, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        none = (None,) * 4
        if not any(needs):
            return (None, None, None, *none)
        if e2d.shape[0] == 0 or (grad_lp is None and grad_ent is None):
            def zero(t, need):
                return torch.zeros_like(t) if need else None

            grads = zero(e2d, needs[0]), zero(c, needs[1]), zero(bias, needs[2]) if bias is not None else None
            return (*guard_second_order(grads), *none)
        # stats.py: g = -a on the loss term, h = -h_ent * entropy on the LSE term, r = -h_ent on p log p
        grad_loss = -grad_lp.float().contiguous() if grad_lp is not None else torch.zeros_like(lse)
        grad_lse = grad_plogp = None
        if grad_ent is not None:
            grad_plogp = -grad_ent.float().contiguous()
            grad_lse = grad_plogp * ent
        with torch.no_grad(), autocast_off(e2d.device):
            grads = ctx.backend.backward(
                e2d, c, bias, targets_flat, ctx.spec, lse, grad_loss, grad_lse, needs,
                grad_plogp=grad_plogp, logit_scale=ctx.stats.logit_scale,
            )
        return (*guard_second_order(grads), *none)  # a derivative of these gradients raises DoubleBackwardError


def linear_log_probs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    shift: bool = False,
    outputs: Iterable[str] = ("log_probs",),
    impl: str = "auto",
    check_targets: bool = True,
) -> TokenStats:
    """Per-token log-probability of ``targets`` under ``softcap(logit_scale * (e @ c.T + bias)) / temperature``,
    and the statistics named in ``outputs``, without materialising the logits.

    Args:
        e: ``(..., D)`` hidden states (fp32, fp16 or bf16); under autocast, ``e``, ``c`` and ``bias`` are cast
            as autocast casts ``F.linear``'s inputs, and the op's arithmetic stays fp32 (``autocast.py``, as for
            ``linear_cross_entropy``). A derivative of its gradients (double backward) raises
            ``DoubleBackwardError``. Under ``torch.compile`` it runs (checked on the torch path), with graph breaks:
            unlike ``linear_cross_entropy`` it is not registered as custom ops (``compiled.py``).
        c: ``(V, D)`` classifier, e.g. ``lm_head.weight``; same dtype as ``e``.
        targets: ``(...)`` integer class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional ``(V,)`` classifier bias.
        ignore_index: targets with this value get 0 in every field (False in ``is_top1``) and no gradient.
        softcap: if set, the scaled logits are capped as ``softcap * tanh(y / softcap)`` (Gemma 2: 30.0).
        logit_scale: the model's logit multiplier, applied before the cap (Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``); 1 for most models.
        temperature: the capped logits are divided by it (sampling temperature of RL trainers).
        shift: causal-LM shift, as in ``linear_cross_entropy``: position t is scored against target t + 1 and
            the last position of each sequence counts for nothing; outputs keep the targets' shape.
        outputs: which fields to compute among ``("log_probs", "entropy", "log_sum_sq_probs", "mean_logits",
            "is_top1")`` (TRL's names); ``log_probs`` always is. Each extra field costs a little in the
            forward pass; an entropy that receives a gradient adds one term to the backward.
        impl: ``"auto"`` (Triton on CUDA, the chunked torch path elsewhere and for IEEE fp32), ``"triton"`` or
            ``"torch"``.
        check_targets: verify target values lie in ``[0, V)`` (one host sync on GPU).

    Returns:
        A :class:`TokenStats`. ``log_probs`` and ``entropy`` are differentiable (the backward recomputes the
        logits chunk by chunk, exactly); ``-log_probs`` is ``linear_cross_entropy(..., reduction="none")``.
        The math of each field: ``cce_patch/ops/stats.py``.
    """
    names = _check_outputs(outputs)
    temperature = _check_positive_finite("temperature", temperature)
    logit_scale = _check_finite("logit_scale", logit_scale)
    check_softcap(softcap)
    e, c, bias = autocast_inputs(e, c, bias)  # the rule of linear_cross_entropy (autocast.py)
    validate_inputs(
        e, c, targets, bias=bias, ignore_index=ignore_index, softcap=softcap, reduction="none", shift=shift,
        label_smoothing=0.0, impl=impl, check_targets=check_targets,
    )
    backend = get_backend(resolve_impl(impl, e.device, e.dtype))
    e2d, c_in, targets_flat, bias_in = flat_operands(e, c, targets, bias)
    # stats.py: softcap_k(y) / tau == softcap_{k / tau}(y / tau), so the temperature folds into the cap and alpha
    spec = LossSpec(
        ignore_index=int(ignore_index),
        softcap=float(softcap) / temperature if softcap is not None else None,
        shift_period=targets.shape[-1] if shift else 0,
    )
    stats = StatsSpec.from_outputs(names, logit_scale=logit_scale / temperature)
    fields = TokenStatsFunction.apply(e2d, c_in, bias_in, targets_flat, spec, stats, backend)
    mask = valid_rows(targets_flat, spec)
    return TokenStats(*(x.view(targets.shape) if x is not None else None for x in fields), mask.view(targets.shape))
