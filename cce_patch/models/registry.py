"""Declarative table of what the generic mechanism cannot find out by itself. Adding a family is a row, or nothing.

The mechanism (``forward.py``, ``intercept.py``, ``deferred.py``) needs one fact about a model: which module is
its head. transformers says it (``get_output_embeddings()``) for nearly every causal LM; a row names it where
it does not. Everything else (soft caps, logit scales, MoE auxiliary losses, unshifted labels, multimodal
inputs) is read from the stock forward as it runs. A row can also refuse a family up front, with the reason,
where its loss cannot be computed from one head's logits; families that are not listed and do something CCE
cannot reproduce are refused at their first training call, with the operation named.

The census (``python -m cce_patch.models.census``) checks every causal-LM type of the installed transformers
against stock, loss and every gradient; docs/models.md is its table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .heads import head_module


@dataclass(frozen=True)
class FamilySpec:
    """What differs between causal-LM families, as data.

    Attributes:
        head_attr: dotted path of the head module, where ``get_output_embeddings()`` does not return it.
        refuse: why the family cannot be trained exactly through CCE; ``patch`` raises NotImplementedError with it.
    """

    head_attr: str | None = None
    refuse: str | None = None


_ASSISTANT = FamilySpec(refuse=(
    "it is a speculative-decoding assistant: its forward takes the target model's shared_kv_states and computes no "
    "loss, so there is no training loss for CCE to compute."
))
_NGRAM = FamilySpec(refuse=(
    "its loss is ProphetNet's n-gram stream loss, computed from log_softmax of the logits of every predicting "
    "stream (_compute_loss, with its own label smoothing); CCE computes a plain cross-entropy. Train it without "
    "cce_patch."
))
_CODEBOOKS = FamilySpec(refuse=(
    "it has one head per audio codebook (lm_heads) and stacks their logits before its loss; CCE computes the loss "
    "of one head. Train it without cce_patch."
))

#: model_type -> row. Types without a row use the defaults (head from get_output_embeddings()).
FAMILIES: dict[str, FamilySpec] = {
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "musicgen_decoder": _CODEBOOKS,  # MusicgenForCausalLM's config is the decoder's
    "musicgen_melody_decoder": _CODEBOOKS,
    "prophetnet": _NGRAM,
    "xlm-prophetnet": _NGRAM,  # transformers < 5
}

_DEFAULT = FamilySpec()


def model_type_of(model: nn.Module | type) -> str:
    config = getattr(model, "config", None) if not isinstance(model, type) else getattr(model, "config_class", None)
    return getattr(config, "model_type", None) or (model.__name__ if isinstance(model, type) else type(model).__name__)


def _row(model: nn.Module | type) -> FamilySpec:
    spec = FAMILIES.get(model_type_of(model), _DEFAULT)
    if spec.refuse is not None:
        name = model.__name__ if isinstance(model, type) else type(model).__name__
        raise NotImplementedError(
            f"model type {model_type_of(model)!r} ({name}) is not supported by cce_patch: {spec.refuse}"
        )
    return spec


def spec_for(model: nn.Module | type) -> FamilySpec:
    """The row of a model (instance or class), NotImplementedError with the row's reason for refused ones. For an
    instance, ``head_attr`` is filled in with the head's path (``"lm_head"``, ``"cls.predictions.decoder"``)."""
    spec = _row(model)
    if isinstance(model, type) or spec.head_attr is not None:
        return spec
    head = resolve_head(model)
    path = next((name for name, module in model.named_modules() if module is head), None)
    return FamilySpec(head_attr=path, refuse=None)


def resolve_head(model: nn.Module) -> nn.Module:
    """The head module of ``model`` (a ``*ForCausalLM`` or wrapper model), or NotImplementedError."""
    spec = _row(model)
    head = head_module(model, spec.head_attr)
    if head is None:
        where = f"`.{spec.head_attr}`" if spec.head_attr else "get_output_embeddings()"
        raise NotImplementedError(
            f"model type {model_type_of(model)!r} ({type(model).__name__}) has no head module at {where}, so cce_patch "
            "cannot find the projection to the vocabulary. Add a FamilySpec row with its head_attr to "
            "cce_patch/models/registry.py."
        )
    return head
