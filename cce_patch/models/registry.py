"""Declarative table of model-family quirks. Adding a family is one row here plus one test entry.

The generic forward (``forward.py``) needs to know four things about a ``*ForCausalLM``: where the decoder
is, where the head is, whether the logits are soft-capped, and whether they are scaled. Everything else is
shared: every standard causal LM runs ``hidden = self.<base>(...).last_hidden_state`` and
``logits = self.<head>(hidden)`` followed by ``self.loss_function``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class FamilySpec:
    """What differs between causal-LM families, as data.

    Attributes:
        base_attr: attribute holding the decoder (returns ``last_hidden_state``).
        head_attr: attribute holding the output projection (an ``nn.Linear``; tied or not, its weight is used).
        softcap_attr: config attribute with the final-logit soft cap (``cap * tanh(logits / cap)``), if any.
        logit_scale_attr: config attribute with a logit multiplier, if any (``logits * scale``).
        logit_divisor_attr: config attribute with a logit divisor, if any (``logits / divisor``).
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

#: model_type -> quirks. Families with the standard structure need no row; they are listed to document what
#: is tested, and so that a future quirk has an obvious place to go.
FAMILIES: dict[str, FamilySpec] = {
    "llama": _STANDARD,
    "qwen2": _STANDARD,
    "phi3": _STANDARD,
    "mistral": _STANDARD,
    "gemma2": FamilySpec(softcap_attr="final_logit_softcapping"),
    "gemma3_text": FamilySpec(softcap_attr="final_logit_softcapping"),
    "cohere": FamilySpec(logit_scale_attr="logit_scale"),
    "granite": FamilySpec(logit_divisor_attr="logits_scaling"),
}

#: Config attributes that change the logits in ways an unknown family might implement differently: a model
#: type not in FAMILIES that sets one of them is refused rather than trained on a silently different loss.
_QUIRK_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_softcapping")


def spec_for(model: nn.Module) -> FamilySpec:
    """The FamilySpec of a ``*ForCausalLM`` instance, or NotImplementedError naming its model type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    spec = FAMILIES.get(model_type)
    if spec is None:
        quirks = [a for a in _QUIRK_ATTRS if getattr(config, a, None) not in (None, 1, 1.0)]
        if quirks:
            raise NotImplementedError(
                f"model type {model_type!r} ({type(model).__name__}) scales its logits through {quirks}; "
                "cce_patch has no registry row for it. Add a FamilySpec to cce_patch/models/registry.py."
            )
        spec = FamilySpec(softcap_attr="final_logit_softcapping")  # a standard config attribute when present
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
