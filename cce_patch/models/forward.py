"""The one generic patched forward for every ``*ForCausalLM`` (quirks come from ``registry.FamilySpec``).

When labels are given (``shift_labels``, if passed too, are used pre-shifted as in stock) and CCE applies
(training, or ``train_only=False``, or the Trainer's ``skip_logits``),
the decoder runs as usual and the loss comes from the final hidden states and the head weight through
``linear_cross_entropy``: the ``[tokens x vocab]`` logits are never built, and ``logits`` is ``None`` in the
output (unless ``return_logits``). Otherwise the original forward runs untouched, so generation, caches and
``logits_to_keep`` behave exactly as stock.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import CCEConfig
from ..integrations.peft import effective_head
from ..ops import linear_cross_entropy
from .registry import spec_for

#: Keyword arguments that belong to the loss (transformers' ForCausalLMLoss) or to the Trainer, not the decoder.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index", "skip_logits")


def cce_config_of(model: torch.nn.Module) -> CCEConfig:
    """The CCEConfig stored on the instance (instance patch) or its class (class patch)."""
    return model.__dict__.get("_cce_config") or getattr(type(model), "_cce_config", None) or CCEConfig()


def call_original(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the forward that patching replaced (an instance's own, else the class's original)."""
    original = model.__dict__.get("_cce_original_forward")
    if original is not None:  # the instance had its own forward (e.g. a wrapper installed by accelerate)
        return original(*args, **kwargs)
    cls = type(model)
    for klass in cls.__mro__:  # a class patch keeps the class's original forward
        if "_cce_class_original_forward" in klass.__dict__:
            return klass.__dict__["_cce_class_original_forward"](model, *args, **kwargs)
    return cls.forward(model, *args, **kwargs)


def cce_forward(
    self: torch.nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
) -> CausalLMOutputWithPast | tuple:
    """Patched ``ForCausalLM.forward``. ``**kwargs`` stays in the signature: the Trainer only passes
    ``num_items_in_batch`` to forwards that accept it, which keeps gradient accumulation exact."""
    config = cce_config_of(self)
    shift_labels = kwargs.get("shift_labels")
    has_labels = labels is not None  # as stock: `shift_labels` replaces the shifted labels, never alone
    wants_cce = self.training or not config.train_only or bool(kwargs.get("skip_logits"))
    if not (has_labels and wants_cce):
        return call_original(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )

    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    spec = spec_for(self)
    outputs = getattr(self, spec.base_attr)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = effective_head(getattr(self, spec.head_attr))
    scale = spec.logit_multiplier(self.config)
    softcap = spec.softcap(self.config)
    features = hidden * scale if scale is not None else hidden  # (s*h) @ W.T == s * logits

    if shift_labels is not None:
        targets, shift = shift_labels, False
    else:
        targets, shift = labels, True
    targets = targets.to(hidden.device)
    num_items = loss_kwargs.get("num_items_in_batch")
    loss = linear_cross_entropy(
        features, head.weight, targets, bias=head.bias, ignore_index=loss_kwargs.get("ignore_index", -100),
        softcap=softcap, shift=shift, reduction="sum" if num_items is not None else "mean", impl=config.impl,
        check_targets=config.check_targets,
    )
    if num_items is not None:  # as transformers' fixed_cross_entropy: sum / items across accumulation steps
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    logits = None
    if config.return_logits:
        logits = head(features)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    out = CausalLMOutputWithPast(
        loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
    )
    return out if return_dict else out.to_tuple()
