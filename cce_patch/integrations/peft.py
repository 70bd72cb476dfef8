"""PEFT glue: find the model to patch inside a PeftModel, and the weight that really is the head.

LoRA on attention/MLP changes nothing for CCE: the decoder runs through PEFT's layers and CCE only reads
the head. The head itself is different: a ``modules_to_save`` copy of ``lm_head`` is a plain Linear (its
weight is what trains, and CCE uses it), but a LoRA adapter on ``lm_head`` computes ``W x + B A x`` and
feeding ``W`` alone to the kernel would silently drop the adapter from the loss. That case is refused.
peft is imported lazily: models without it never need the package.
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


def effective_head(head: nn.Module) -> nn.Linear:
    """The nn.Linear whose weight (and bias) produce the logits.

    ModulesToSaveWrapper -> the active trainable copy (or the original when adapters are disabled).
    A LoRA-adapted head -> NotImplementedError (its effective weight is not a single tensor).
    """
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
    raise NotImplementedError(
        f"unsupported head module {type(head).__name__} (a PEFT adapter such as trainable_token_indices?): "
        "cce_patch needs the head to be an nn.Linear, or a modules_to_save copy of one, so that the weight it "
        "passes to the kernel is the weight that produces the logits."
    )
