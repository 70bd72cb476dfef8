"""Which module is the head, and which model to patch: PEFT and ``torch.compile`` wrappers looked through.

LoRA on attention/MLP changes nothing for CCE: the decoder runs through PEFT's layers and CCE only replaces
the head's final ``F.linear``. The head itself is different: a ``modules_to_save`` copy of ``lm_head`` is a
plain Linear (its weight is what trains, and CCE uses it), PEFT's trainable tokens compute one merged weight
for one ``F.linear`` (CCE uses that), but a LoRA adapter on ``lm_head`` computes ``W x + B A x`` and CCE would
have to drop the second term: that case is refused. peft is imported lazily: models without it never need it.
"""

from __future__ import annotations

import torch.nn as nn


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a PeftModel (``get_base_model()``), or the model itself."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


def is_compiled(model: object) -> bool:
    """A ``torch.compile(model)`` wrapper (``OptimizedModule``), whose ``_orig_mod`` is the real model."""
    return isinstance(getattr(model, "__dict__", {}).get("_modules", {}).get("_orig_mod"), nn.Module) and type(
        model
    ).__name__ == "OptimizedModule"


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose forward a patch wraps: through ``torch.compile`` and PEFT wrappers, in any order."""
    while True:
        if is_compiled(model):
            model = model._orig_mod
        elif is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


def shadowed(head: object) -> object:
    """The head module behind the stand-in that shadows it during a CCE call (``intercept.py``), or ``head``."""
    return getattr(head, "cce_shadowed_head", head)


def head_module(model: nn.Module, head_attr: str | None = None) -> nn.Module | None:
    """The module whose forward produces the logits: ``head_attr`` (a dotted path, from a registry row) or
    transformers' ``get_output_embeddings()``. None when the model has neither."""
    if head_attr is not None:
        module: object = model
        for part in head_attr.split("."):
            module = getattr(module, part, None)
        module = shadowed(module)
        return module if isinstance(module, nn.Module) else None
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = shadowed(getter()) if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def effective_head(head: nn.Module) -> nn.Linear:
    """The nn.Linear whose weight (and bias) produce the logits, refusing heads CCE cannot reproduce.

    ModulesToSaveWrapper -> the active trainable copy (or the original when adapters are disabled);
    trainable tokens -> the wrapped Linear (its merged weight is what the final ``F.linear`` receives);
    a LoRA-adapted head -> NotImplementedError (its effective weight is not a single tensor).
    """
    head = shadowed(head)
    if isinstance(head, nn.Linear) and not hasattr(head, "lora_A"):
        return head
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        if getattr(head, "disable_adapters", False):
            return effective_head(head.original_module)
        active = head.active_adapters if hasattr(head, "active_adapters") else [head.active_adapter]
        saved = [name for name in active if name in head.modules_to_save]
        if not saved:  # as PEFT's forward: an adapter that does not save the head uses the original
            return effective_head(head.original_module)
        if len(saved) != 1:
            raise NotImplementedError("cce_patch supports one active modules_to_save adapter on lm_head")
        return effective_head(head.modules_to_save[saved[0]])
    if hasattr(head, "lora_A") or hasattr(head, "lora_embedding_A"):
        raise NotImplementedError(
            "a LoRA adapter on lm_head is not supported by cce_patch: the adapted weight is W + B @ A, and "
            "passing W alone would train the wrong loss. Remove 'lm_head' from target_modules, or list it in "
            "modules_to_save to fine-tune the full head."
        )
    if hasattr(head, "trainable_tokens_delta") and isinstance(getattr(head, "base_layer", None), nn.Linear):
        return head.base_layer
    if hasattr(head, "token_adapter") and hasattr(head, "original_module"):  # TrainableTokensWrapper
        return effective_head(head.token_adapter)
    raise NotImplementedError(
        f"unsupported head module {type(head).__name__}: cce_patch needs the head to be an nn.Linear (or a "
        "subclass), a modules_to_save copy of one, or a trainable-tokens layer over one, so that the weight "
        "it passes to the kernel is the weight that produces the logits."
    )
