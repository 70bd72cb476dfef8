"""The fused LM head on cce_patch's kernel: ``model(..., labels=labels, fused_lm_head=True)`` returns per-token
log-probabilities (and entropy, accuracy, ...) instead of logits, and never materialises the logits.

This is TRL's fused-head protocol (``trl.trainer.utils.add_fused_lm_head``, TRL >= 1.15), implemented on
``cce_patch.linear_log_probs`` without importing TRL: ``trl.py`` installs it, with TRL's output class, on
patched models that TRL's trainers train; the plain Trainer uses it, with :class:`FusedHeadOutput`, to log token
accuracy and entropy without logits (``trainer.py``, ``cce_token_metrics``).

The logits are TRL's head's: ``softcap(logit_scale * (h @ W.T + b)) / temperature``, the soft cap and the scale
read from the config the way TRL reads them (``logit_transform``), so a trainer gets the numbers it gets from
TRL's own head (up to rounding: our logits are never rounded to bf16). The loss is TRL's: the sum of
``-log_probs`` over the counted tokens divided by ``num_items_in_batch`` (their count when not given), plus
the MoE load-balancing loss when router logits are asked for.

Also here: :func:`watch_for_bypass`, which warns when a patched model's training loss is computed from
materialised logits after all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import math
import types
import warnings
from typing import Any

import torch
import torch.nn as nn
from packaging.version import Version
from transformers.utils import ModelOutput

from ..models.sharding import gather_for_loss
from ..ops import linear_log_probs
from ..ops.stats import OUTPUTS

logger = logging.getLogger("cce_patch")


class CCEBypassWarning(UserWarning):
    """A model patched with cce_patch computed its training loss through a path that does not use our kernel."""


@dataclasses.dataclass
class FusedHeadOutput(ModelOutput):
    """What the fused head returns (the fields of TRL's ``FusedCausalLMOutput``): every per-token field has the
    labels' shape minus the last position ((batch, seq - 1), or (batch, seq) for pre-shifted ``shift_labels``),
    is 0 (False) where the label is -100, and is None when not asked for."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class FusedHeadOptions:
    """What the head was asked for (``add_fused_lm_head``'s arguments)."""

    temperature: float = 1.0
    cast_lm_head_to_fp32: bool = False
    outputs: tuple[str, ...] = ("log_probs",)


# ----- what cce_patch knows about a model ---------------------------------------------------------------------
# The models room is being restructured (its accessors move between modules); these four functions are the only
# places this file reads it, and each accepts both layouts (besides models/sharding.py's gather_for_loss, new).
def _peft_helpers():
    try:
        from .peft import effective_head, unwrap_peft
    except ImportError:  # the models room's layout with heads.py
        from ..models.heads import effective_head, unwrap_peft
    return effective_head, unwrap_peft


def base_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a PeftModel, or the model itself."""
    return _peft_helpers()[1](model)


def is_cce_patched(model: nn.Module | None) -> bool:
    """Whether ``model`` (a ``*ForCausalLM`` or a PeftModel around one) is patched, itself or through its class."""
    if not isinstance(model, nn.Module):
        return False
    from ..models import is_patched

    base = base_model(model)
    return is_patched(base) or any(is_patched(k) for k in type(base).__mro__[:-1] if issubclass(k, nn.Module))


def cce_config(model: nn.Module):
    """The CCEConfig of a patched model (the defaults for an unpatched one)."""
    from .. import models

    config_of = getattr(models, "config_of", None)
    if config_of is None:
        from ..models.forward import cce_config_of as config_of
    return config_of(base_model(model)) or _default_config()


def _default_config():
    from ..config import CCEConfig

    return CCEConfig()


def head_linear(model: nn.Module) -> nn.Linear:
    """The nn.Linear whose weight (and bias) produce the logits: PEFT's modules_to_save copy when it trains,
    NotImplementedError for a LoRA adapter on the head (its weight is not one tensor; TRL's head would drop it)."""
    effective_head = _peft_helpers()[0]
    head = model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(f"{type(model).__name__} has no output embeddings (lm_head) for a fused LM head")
    return effective_head(head)


def logit_transform(text_config: Any) -> tuple[float | None, float]:
    """(soft cap, logit scale) as TRL's fused head reads them from the config: the cap from
    ``final_logit_softcapping``; the scale from ``logit_scale`` (Cohere), ``output_multiplier``,
    ``lm_head_multiplier`` (Falcon-H1) or ``logits_scaling`` (a divisor for Granite and MiniCPM3, a multiplier for
    HyperCLOVA X); 1 when none is set."""
    cap = getattr(text_config, "final_logit_softcapping", None) or None
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        divisor = text_config.logits_scaling
        scale = divisor if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / divisor
    return (float(cap) if cap is not None else None), (1.0 if scale is None else float(scale))


def check_options(temperature: object, outputs: object) -> tuple[float, tuple[str, ...]]:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"the fused LM head's temperature must be a positive finite number, got {temperature!r}")
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown fused LM head output(s) {unknown}; cce_patch computes {OUTPUTS}")
    return float(temperature), names


def _check_config(model: nn.Module) -> None:
    """The patched model's options that the per-token protocol cannot honour: refused or said, at install."""
    if not is_cce_patched(model):
        return
    config = cce_config(model)
    if config.label_smoothing:
        raise ValueError(
            f"{type(model).__name__} is patched with label_smoothing={config.label_smoothing}, which a fused LM head "
            "cannot apply (it returns per-token log-probabilities, the trainer forms the loss). Patch without "
            "label_smoothing, or train with a plain Trainer / CCETrainer, whose loss is the patched forward's."
        )
    if config.mode == "speed":
        logger.warning("%s: mode='speed' forms the gradients of a scalar loss; a fused LM head returns per-token "
                       "values, so it runs in memory mode", type(model).__name__)


# ----- the head --------------------------------------------------------------------------------------------------
def install_fused_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    output_class: type = FusedHeadOutput,
) -> None:
    """Replace ``model.forward`` by one that, with ``fused_lm_head=True``, runs the backbone and
    ``linear_log_probs`` and returns ``output_class`` with the fields in ``outputs`` (``log_probs`` always);
    without ``fused_lm_head`` it is the forward the model had (generation and evaluation unchanged). The kernel's
    ``impl`` and ``check_targets`` are the patched model's CCEConfig's."""
    temperature, outputs = check_options(temperature, outputs)
    _check_config(model)
    options = FusedHeadOptions(temperature, bool(cast_lm_head_to_fp32), outputs)
    original_forward = model.forward
    text_config = model.config.get_text_config()
    softcap, logit_scale = logit_transform(text_config)
    # transformers < 5 exposes a VLM's language backbone as `model`, later ones through `base_model_prefix`
    backbone_attr = "base_model"
    if text_config is not model.config and Version(importlib.metadata.version("transformers")) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)  # generate() and the Trainer read this signature
    def cce_fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                          **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the head scores the next tokens")
        # Looked up on every call: FSDP and PEFT replace the backbone and the head after this function runs
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        fields = score(self, backbone_outputs.last_hidden_state, labels, shift_labels, options, softcap, logit_scale)
        mask = fields["label_mask"]
        loss = -fields["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None
                                             else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return output_class(loss=loss, aux_loss=aux_loss, **fields)

    cce_fused_forward._cce_fused_head = options
    model.forward = types.MethodType(cce_fused_forward, model)
    if is_cce_patched(model):
        watch_for_bypass(model)
        if getattr(cce_config(model), "filter_eps", None) is not None:  # say it rather than ignore it silently
            logger.warning("%s: filter_eps applies to the CCE loss only; TRL's fused head (per-token log-probs) "
                           "computes its gradients exactly", type(model).__name__)
    logger.info("fused LM head on %s (outputs=%s, temperature=%g%s)", type(model).__name__,
                ",".join(outputs), temperature, ", lm_head in fp32" if cast_lm_head_to_fp32 else "")


def score(model, hidden, labels, shift_labels, options: FusedHeadOptions, softcap, logit_scale) -> dict:
    """The per-token fields and ``label_mask``, (batch, seq - 1) for ``labels`` (the last position predicts
    nothing) or (batch, seq) for pre-shifted ``shift_labels``."""
    head = head_linear(model)
    gather_for_loss(base_model(model), head)  # an FSDP2 group of the head's own: unsharded, as its forward would
    weight, bias = head.weight, head.bias
    if type(weight).__name__ == "DTensor":  # still sharded (a tensor-parallel head): gather it, as TRL does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    shift = shift_labels is None
    targets = (labels if shift else shift_labels).to(weight.device)
    hidden = hidden.to(weight.device)
    config = cce_config(model)
    autocast = contextlib.nullcontext()
    if options.cast_lm_head_to_fp32:  # TRL: the projection in fp32, outside autocast
        hidden, weight = hidden.float(), weight.float()
        bias = bias.float() if bias is not None else None
        autocast = torch.autocast(hidden.device.type, enabled=False)
    with autocast:
        stats = linear_log_probs(
            hidden, weight, targets, bias=bias, softcap=softcap, logit_scale=logit_scale,
            temperature=options.temperature, shift=shift, outputs=options.outputs, impl=config.impl,
            check_targets=config.check_targets,
        )

    def aligned(x):  # under the shift the op keeps the targets' shape, and the last position counts for nothing
        return x[:, :-1] if shift and x is not None else x

    return {name: aligned(getattr(stats, name)) for name in OUTPUTS} | {"label_mask": aligned(stats.mask)}


def _load_balancing_loss(model, text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss TRL's head adds (Mixtral's, which every MoE family reuses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    tf = Version(importlib.metadata.version("transformers"))
    old_api = tf < Version("5.0.0") or (text_config.model_type == "gpt_oss" and tf < Version("5.6.0"))
    source = model if old_api else text_config
    return load_balancing_loss_func(backbone_outputs.router_logits, source.num_experts, source.num_experts_per_tok,
                                    attention_mask)


def fused_head_options(model: nn.Module) -> FusedHeadOptions | None:
    """The options of the cce_patch fused head installed on ``model``, or None when it has none."""
    forward = base_model(model).__dict__.get("forward")
    return getattr(getattr(forward, "__func__", forward), "_cce_fused_head", None)


# ----- bypass detection ------------------------------------------------------------------------------------------
def watch_for_bypass(model: nn.Module) -> None:
    """Warn once (``CCEBypassWarning``) when the head of this patched model returns real ``[.., V]`` logits under
    autograd in training mode: that step's loss is computed from logits, not by cce_patch's kernel (a loss
    computed from ``outputs.logits``, the Trainer's label smoothing, a trainer that calls the model without
    labels...). cce_patch's own paths never return real logits from the head in training. Idempotent."""
    head = base_model(model).get_output_embeddings()
    if head is None or "_cce_bypass_watch" in head.__dict__:
        return
    vocab = base_model(model).config.get_text_config().vocab_size
    name = type(base_model(model)).__name__
    state = {"warned": False}

    def after_head(module, args, output):
        if state["warned"] or not (module.training and torch.is_grad_enabled()):
            return
        if type(output) is torch.Tensor and output.dim() >= 2 and output.requires_grad and output.shape[-1] in (
                vocab, getattr(getattr(module, "weight", None), "shape", (0,))[0]):
            state["warned"] = True
            warnings.warn(
                f"{name} is patched with cce_patch, but a training forward materialised its {tuple(output.shape)} "
                "logits with autograd on: this loss is not computed by cce_patch's kernel (a loss computed from "
                "outputs.logits, the Trainer's label smoothing, a trainer or callback calling the model without "
                "labels...), and the logits cost the memory CCE saves.",
                CCEBypassWarning,
                stacklevel=2,
            )

    head.__dict__["_cce_bypass_watch"] = head.register_forward_hook(after_head)
