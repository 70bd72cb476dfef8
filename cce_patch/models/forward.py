"""The one generic patched forward for every ``*ForCausalLM`` (quirks come from ``registry.FamilySpec``).

When labels (or pre-shifted ``shift_labels``) are given and CCE applies (training, or ``train_only=False``, or
the Trainer's ``skip_logits=True``), the decoder runs as usual and the loss comes from the final hidden states
and the head weight through ``linear_cross_entropy``: the ``[tokens x vocab]`` logits are never built, and
``logits`` is ``None`` in the output (unless ``return_logits``). Otherwise the original forward runs untouched,
so generation, caches and ``logits_to_keep`` behave exactly as stock.

The patched function carries the original's signature (``__wrapped__``): the Trainer reads it to decide which
dataset columns to keep and whether the model accepts ``num_items_in_batch``, and positional calls are bound
to the original parameter order before anything else happens.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..config import CCEConfig
from ..integrations.peft import effective_head
from ..ops import linear_cross_entropy
from .registry import original_forward, spec_for

#: Keyword arguments that belong to transformers' ForCausalLMLoss or to the Trainer, never to the decoder.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index")


def cce_config_of(model: torch.nn.Module) -> CCEConfig:
    """The CCEConfig stored on the instance (instance patch) or its class (class patch)."""
    return model.__dict__.get("_cce_config") or getattr(type(model), "_cce_config", None) or CCEConfig()


def call_original(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run the forward that patching replaced (an instance's own, else the class's original)."""
    own = model.__dict__.get("_cce_original_forward")
    if own is not None:  # the instance had its own forward (e.g. a wrapper installed by accelerate)
        return own(*args, **kwargs)
    return original_forward(type(model))(model, *args, **kwargs)


@functools.lru_cache(maxsize=256)
def _signature(forward: Callable) -> inspect.Signature:
    return inspect.signature(forward)


def _output_class(signature: inspect.Signature) -> type:
    """The output class the family's forward declares (CausalLMOutputWithPast when not declared)."""
    annotation = signature.return_annotation
    if isinstance(annotation, type) and issubclass(annotation, ModelOutput):
        return annotation
    return CausalLMOutputWithPast


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], inspect.Signature]:
    """Every argument the caller passed, by name (``**kwargs`` flattened), as the original forward binds them."""
    signature = _signature(original_forward(type(model)))
    bound = signature.bind(model, *args, **kwargs)
    named: dict[str, Any] = {}
    params = list(signature.parameters.values())
    for name, value in list(bound.arguments.items())[1:]:  # drop self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{params[0].name}.forward got unexpected positional arguments {value!r}")
        else:
            named[name] = value
    return named, signature


def cce_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> ModelOutput | tuple:
    """Patched ``ForCausalLM.forward``. ``**kwargs`` stays in the signature: the Trainer only passes
    ``num_items_in_batch`` to forwards that accept it, which keeps gradient accumulation exact."""
    config = cce_config_of(self)
    skip_logits = kwargs.pop("skip_logits", None)  # the Trainer's "loss only" request; stock forwards never see it
    named, signature = _bind(self, args, kwargs)
    labels, shift_labels = named.pop("labels", None), named.pop("shift_labels", None)
    wants_cce = skip_logits if skip_logits is not None else (self.training or not config.train_only)
    if (labels is None and shift_labels is None) or not wants_cce:
        return call_original(self, *args, **kwargs)

    loss_kwargs = {k: named.pop(k) for k in _LOSS_KWARGS if k in named}
    named.pop("logits_to_keep", None)  # the loss covers every position, as stock's does with labels
    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    spec = spec_for(self)
    outputs = getattr(self, spec.base_attr)(**named)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = effective_head(getattr(self, spec.head_attr))
    weight, bias = head.weight, head.bias
    scale, softcap = spec.logit_multiplier(self.config), spec.softcap(self.config)
    if scale is not None:  # s * (h @ W.T + b) == (s * h) @ W.T + s * b, without touching W
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None

    if shift_labels is not None:  # already aligned with the positions, as transformers' ForCausalLMLoss
        targets, shift = shift_labels, False
    else:
        targets, shift = labels, True
    num_items = loss_kwargs.get("num_items_in_batch")
    reduction = "sum" if num_items is not None else "mean"
    loss = linear_cross_entropy(
        hidden, weight, targets.to(hidden.device), bias=bias, ignore_index=loss_kwargs.get("ignore_index", -100),
        softcap=softcap, shift=shift, reduction=reduction, **config.op_options(hidden.dtype, softcap, reduction),
    )
    if num_items is not None:  # as transformers' fixed_cross_entropy: sum / items across accumulation steps
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    logits = None
    if config.return_logits:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    out_cls = _output_class(signature)
    carried = {
        f.name: getattr(outputs, f.name) for f in dataclasses.fields(out_cls)
        if f.name not in ("loss", "logits") and isinstance(outputs, ModelOutput) and f.name in outputs
    }
    out = out_cls(loss=loss, logits=logits, **carried)
    return out if return_dict else out.to_tuple()


def make_patched_forward(original: Callable) -> Callable:
    """``cce_forward`` dressed as ``original`` (name, docstring, signature via ``__wrapped__``)."""

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> ModelOutput | tuple:
        return cce_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, original)
    forward._cce_patched = True
    return forward
