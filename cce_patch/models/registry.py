"""Declarative table of model-family quirks. Adding a family is one row here plus one test entry.

The generic forward (``forward.py``) needs four facts about a ``*ForCausalLM``: where the decoder is, where the
head is, whether the logits are soft-capped, and whether they are scaled. Rows state them for the families we
test. A model type without a row is patched only if its forward's source has the standard shape
(``structure.py``), from which the same four facts are read; anything else is refused with
``NotImplementedError`` rather than trained on a silently different loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .structure import NonStandardForward, forward_shape


@dataclass(frozen=True)
class FamilySpec:
    """What differs between causal-LM families, as data.

    Attributes:
        base_attr: attribute holding the decoder (returns ``last_hidden_state``).
        head_attr: attribute holding the output projection (an ``nn.Linear``; tied or not, its weight is used).
        softcap_attr: config attribute with the final-logit soft cap (``cap * tanh(logits / cap)``), if any.
        logit_scale_attr: config attribute with a logit multiplier, if any (``logits * scale``, Cohere).
        logit_divisor_attr: config attribute with a logit divisor, if any (``logits / divisor``, Granite).
    """

    base_attr: str = "model"
    head_attr: str = "lm_head"
    softcap_attr: str | None = None
    logit_scale_attr: str | None = None
    logit_divisor_attr: str | None = None

    def softcap(self, config: Any) -> float | None:
        value = getattr(config, self.softcap_attr, None) if self.softcap_attr else None
        return float(value) if value else None

    def logit_multiplier(self, config: Any) -> float | None:
        """The factor applied to the logits (before any soft cap), or None when they are not scaled."""
        if self.logit_scale_attr and getattr(config, self.logit_scale_attr, None) is not None:
            return float(getattr(config, self.logit_scale_attr))
        if self.logit_divisor_attr and getattr(config, self.logit_divisor_attr, None) is not None:
            return 1.0 / float(getattr(config, self.logit_divisor_attr))
        return None


_STANDARD = FamilySpec()
_SOFTCAPPED = FamilySpec(softcap_attr="final_logit_softcapping")

#: model_type -> quirks. Each row is exercised against stock transformers in tests/test_models_patch.py.
#: Standard families need no row; the five target families are listed so the table documents what is tested.
FAMILIES: dict[str, FamilySpec] = {
    "llama": _STANDARD,
    "qwen2": _STANDARD,
    "phi3": _STANDARD,
    "mistral": _STANDARD,
    "gemma2": _SOFTCAPPED,  # logits = 30 * tanh(logits / 30)
    "gemma3_text": _SOFTCAPPED,  # same code; the cap is None in released configs
    "cohere": FamilySpec(logit_scale_attr="logit_scale"),  # logits = logits * logit_scale
    "cohere2": FamilySpec(logit_scale_attr="logit_scale"),
    "granite": FamilySpec(logit_divisor_attr="logits_scaling"),  # logits = logits / logits_scaling
}


def original_forward(cls: type) -> Any:
    """The class's own forward, looking through a class patch."""
    for klass in cls.__mro__:
        if "_cce_class_original_forward" in klass.__dict__:
            return klass.__dict__["_cce_class_original_forward"]
    return cls.forward


def spec_for(model: nn.Module) -> FamilySpec:
    """The FamilySpec of a ``*ForCausalLM`` instance, or NotImplementedError naming its model type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    spec = FAMILIES.get(model_type)
    if spec is None:
        try:
            shape = forward_shape(original_forward(type(model)))
        except NonStandardForward as exc:
            raise NotImplementedError(
                f"model type {model_type!r} ({type(model).__name__}) is not supported by cce_patch: its forward "
                f"does not have the standard causal-LM shape (at: {str(exc)[:200]}). If it only differs by a "
                "known quirk, add a FamilySpec row to cce_patch/models/registry.py."
            ) from None
        spec = FamilySpec(base_attr=shape.base_attr, head_attr=shape.head_attr, softcap_attr=shape.softcap_attr)
    problems = []
    if not isinstance(getattr(model, spec.base_attr, None), nn.Module):
        problems.append(f"no decoder at `.{spec.base_attr}`")
    if not isinstance(getattr(model, spec.head_attr, None), nn.Module):  # PEFT may wrap it: see effective_head
        problems.append(f"no head module at `.{spec.head_attr}`")
    if problems:
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}) does not have the standard causal-LM structure "
            f"({'; '.join(problems)}), so cce_patch cannot patch it."
        )
    return spec
