"""patch / unpatch: swap ``forward`` of a ``*ForCausalLM`` instance or class for the generic CCE forward.

Instance patches bind the new forward on that instance only (other instances and the class are untouched);
class patches (``patch("llama")`` / ``patch(LlamaForCausalLM)``) affect every instance, including ones made
later by ``from_pretrained``. The replaced forward is remembered so ``unpatch`` restores it exactly, and a
second ``patch`` only updates the stored options.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch.nn as nn
import transformers
from packaging.version import Version

from ..config import CCEConfig
from ..integrations.peft import effective_head, is_peft_model, unwrap_peft
from .forward import make_patched_forward
from .registry import FAMILIES, original_forward, spec_for
from .structure import NonStandardForward, forward_shape

logger = logging.getLogger("cce_patch")

#: Transformers versions whose causal-LM forward contract (``last_hidden_state``, ``loss_function`` kwargs,
#: ``logits_to_keep``) the generic forward follows; declared in pyproject as well.
SUPPORTED_TRANSFORMERS = (Version("4.57"), Version("6"))


def check_transformers_version(version: str | None = None) -> None:
    found = Version(version or transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not (low <= found < high):
        raise RuntimeError(
            f"cce_patch supports transformers >={low},<{high}; found {found}. Install a supported version."
        )


def _config_from(config: CCEConfig | None, options: dict[str, Any], current: CCEConfig | None) -> CCEConfig:
    base = config or current or CCEConfig()
    return base.replace(**options) if options else base


def _causal_lm_class(model_type: str) -> type:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise NotImplementedError(f"no causal-LM class is registered in transformers for model type {model_type!r}")
    return getattr(transformers, name)


def is_patched(target: Any) -> bool:
    """Whether ``target`` itself carries a patch: an instance (or PeftModel) patched by ``patch(instance)``, or a
    class / model type patched by ``patch(cls)``. An unpatched instance of a patched class answers False; its
    class answers True."""
    if isinstance(target, str):
        target = _causal_lm_class(target)
    if isinstance(target, type):
        return "_cce_class_original_forward" in target.__dict__
    return "_cce_original_forward" in unwrap_peft(target).__dict__


def patch(target: Any, config: CCEConfig | None = None, **options: Any) -> Any:
    """Make ``target`` compute its training loss with CCE. Returns ``target``.

    Args:
        target: a ``*ForCausalLM`` instance, a ``PeftModel`` wrapping one, a ``*ForCausalLM`` class, or a
            model type string (``"llama"``, ``"gemma2"``, ...) naming the class.
        config: a CCEConfig; ``**options`` override its fields (``impl="torch"``, ``train_only=False``, ...).
    """
    check_transformers_version()
    if isinstance(target, str):
        return patch(_causal_lm_class(target), config, **options)
    if isinstance(target, type):
        return _patch_class(target, config, options)
    model = unwrap_peft(target)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a model, a model class or a model type string, got {type(target).__name__}")
    spec = spec_for(model)  # NotImplementedError for unsupported architectures
    effective_head(getattr(model, spec.head_attr))  # refuse a LoRA-adapted head before training starts
    new_config = _config_from(config, options, model.__dict__.get("_cce_config"))
    if not is_patched(model):
        model.__dict__["_cce_original_forward"] = model.__dict__.get("forward")
        model.forward = types.MethodType(make_patched_forward(original_forward(type(model))), model)
    model._cce_config = new_config
    logger.info(
        "patched %s (model_type=%s%s) with impl=%s",
        type(model).__name__, model.config.model_type, ", via PEFT" if is_peft_model(target) else "", new_config.impl,
    )
    return target


def _patch_class(cls: type, config: CCEConfig | None, options: dict[str, Any]) -> type:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "forward")):
        raise TypeError(f"patch expects a *ForCausalLM class, got {cls!r}")
    model_type = getattr(getattr(cls, "config_class", None), "model_type", None) or cls.__name__
    if model_type not in FAMILIES:  # refuse a non-standard class now, not at the first training step
        try:
            forward_shape(original_forward(cls))
        except NonStandardForward as exc:
            raise NotImplementedError(
                f"model type {model_type!r} ({cls.__name__}) is not supported by cce_patch: its forward does not "
                f"have the standard causal-LM shape (at: {str(exc)[:200]})."
            ) from None
    if not is_patched(cls):
        cls._cce_class_original_forward = cls.forward
        cls._cce_class_had_own_forward = "forward" in cls.__dict__
        cls._cce_class_own_forward = cls.__dict__.get("forward")
        cls.forward = make_patched_forward(cls.forward)
    cls._cce_config = _config_from(config, options, cls.__dict__.get("_cce_config"))
    logger.info("patched class %s (model_type=%s) with impl=%s", cls.__name__, model_type, cls._cce_config.impl)
    return cls


def unpatch(target: Any) -> Any:
    """Restore the exact forward that ``patch`` replaced. A no-op on something not patched."""
    if isinstance(target, str):
        return unpatch(_causal_lm_class(target))
    if isinstance(target, type):
        if is_patched(target):
            if target._cce_class_had_own_forward:
                target.forward = target._cce_class_own_forward
            else:
                del target.forward
            for name in ("_cce_class_original_forward", "_cce_class_had_own_forward", "_cce_class_own_forward",
                         "_cce_config"):
                delattr(target, name)
        return target
    model = unwrap_peft(target)
    if is_patched(model):
        original = model.__dict__.pop("_cce_original_forward")
        if original is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = original
        model.__dict__.pop("_cce_config", None)
    return target
