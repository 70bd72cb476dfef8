"""patch / unpatch / is_patched for model instances (also inside PeftModel or torch.compile) and classes.

Instance patches put a ``PatchedForward`` on that instance only (other instances and the class are untouched);
class patches (``patch("llama")`` / ``patch(LlamaForCausalLM)``) wrap the class's forward, so every instance,
including ones made later by ``from_pretrained``, is patched. What the patch replaced is remembered
(``state.py``) so ``unpatch`` restores it exactly, and a second ``patch`` only updates the stored options.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn
import transformers
from packaging.version import Version

from ..config import CCEConfig
from .foreign_losses import detect_foreign_loss
from .forward import PatchedForward, class_forward
from .heads import effective_head, is_compiled, is_peft_model, unwrap
from .registry import model_type_of, resolve_head, spec_for
from .state import (
    ClassPatch,
    InstancePatch,
    class_patch,
    instance_patch,
    original_forward,
    set_class_patch,
    set_instance_patch,
)

logger = logging.getLogger("cce_patch")

#: Transformers versions whose causal-LM contract (``get_output_embeddings``, ``loss_function``, output
#: classes) the mechanism follows and the census has checked; declared in pyproject as well.
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
    """Whether ``target`` itself carries a patch: an instance (or a PeftModel / compiled model around one) patched
    by ``patch(instance)``, or a class / model type patched by ``patch(cls)``. An unpatched instance of a patched
    class answers False; its class answers True."""
    if isinstance(target, str):
        target = _causal_lm_class(target)
    if isinstance(target, type):
        return class_patch(target) is not None
    return instance_patch(unwrap(target)) is not None


def patch(target: Any, config: CCEConfig | None = None, **options: Any) -> Any:
    """Make ``target`` compute its training loss with CCE. Returns ``target``.

    Args:
        target: a model instance (``*ForCausalLM``, a multimodal ``*ForConditionalGeneration``, ...), a
            ``PeftModel`` or ``torch.compile`` wrapper around one, a model class, or a model type string
            (``"llama"``, ``"gemma3"``, ...) naming the causal-LM class.
        config: a CCEConfig; ``**options`` override its fields (``impl="torch"``, ``train_only=False``, ...).
    """
    check_transformers_version()
    if isinstance(target, str):
        return patch(_causal_lm_class(target), config, **options)
    if isinstance(target, type):
        return _patch_class(target, config, options)
    if not isinstance(target, nn.Module):
        raise TypeError(f"patch expects a model, a model class or a model type string, got {type(target).__name__}")
    model = unwrap(target)
    effective_head(resolve_head(model))  # NotImplementedError for refused families and heads CCE cannot reproduce
    record = instance_patch(model)
    new_config = _config_from(config, options, record.config if record is not None else None)
    if record is None:
        previous = model.__dict__.get("forward")
        set_instance_patch(model, InstancePatch(new_config, previous))
        model.__dict__["forward"] = PatchedForward(model, previous)
    else:
        set_instance_patch(model, InstancePatch(new_config, record.previous))
    via = ", via PEFT" if is_peft_model(target) else ", inside torch.compile" if is_compiled(target) else ""
    logger.info("patched %s (model_type=%s%s) with impl=%s", type(model).__name__, model_type_of(model), via,
                new_config.impl)
    _say_which_loss_runs(model)
    return target


def _say_which_loss_runs(target: Any) -> None:
    """Another library's fused loss on ``target`` (Liger-Kernel's by default after ``apply_liger_kernel_to_*``)
    means cce_patch's loss does not train it: say so, with what was observed to run (``foreign_losses.py``), the
    moment the user patches, not at the first training step."""
    found = detect_foreign_loss(target)
    if found is not None:
        logger.warning("cce_patch.patch(%s): %s", target.__name__ if isinstance(target, type) else
                       type(target).__name__, found)


def _patch_class(cls: type, config: CCEConfig | None, options: dict[str, Any]) -> type:
    if not (issubclass(cls, nn.Module) and hasattr(cls, "forward")):
        raise TypeError(f"patch expects a model class, got {cls!r}")
    spec_for(cls)  # refuse a refused family now, not at the first training step
    record = class_patch(cls)
    new_config = _config_from(config, options, record.config if record is not None else None)
    if record is None:
        original = original_forward(cls)
        set_class_patch(cls, ClassPatch(new_config, original, cls.__dict__.get("forward")))
        cls.forward = class_forward(cls, original)
    else:
        set_class_patch(cls, ClassPatch(new_config, record.original, record.own))
    logger.info("patched class %s (model_type=%s) with impl=%s", cls.__name__, model_type_of(cls), new_config.impl)
    _say_which_loss_runs(cls)
    return cls


def unpatch(target: Any) -> Any:
    """Restore the exact forward that ``patch`` replaced. A no-op on something not patched."""
    if isinstance(target, str):
        return unpatch(_causal_lm_class(target))
    if isinstance(target, type):
        record = class_patch(target)
        if record is not None:
            if record.own is None:
                del target.forward
            else:
                target.forward = record.own
            set_class_patch(target, None)
        return target
    model = unwrap(target)
    record = instance_patch(model)
    if record is not None:
        if record.previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = record.previous
        set_instance_patch(model, None)
    return target
