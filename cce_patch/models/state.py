"""Patch state: every ``_cce_*`` attribute a patch leaves on a model instance or a class, read and written here.

An instance patch stores its options (``_cce_config``) and the instance's own forward it wrapped
(``_cce_original_forward``, None when that was the class's) in the instance's ``__dict__``, and replaces its
``forward`` with a ``PatchedForward`` (``forward.py``). All three are ordinary picklable objects, so
``torch.save(model)`` / ``pickle`` / ``copy.deepcopy`` give a copy that is patched the same way (its forward
object refers to the copy). A class patch stores its options and what it replaced on the class itself; an
instance of a patched class reads the class's options through ordinary attribute lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import CCEConfig

CONFIG_ATTR = "_cce_config"
PREVIOUS_ATTR = "_cce_original_forward"  # an instance's own forward before the patch (None: the class's)
CLASS_ORIGINAL_ATTR = "_cce_class_original_forward"  # cls.forward before the patch (the stock forward)
CLASS_OWN_ATTR = "_cce_class_own_forward"  # the forward defined on the class itself before the patch, or None


@dataclass
class InstancePatch:
    """What ``patch(instance)`` left on one instance."""

    config: CCEConfig
    previous: Any = None


@dataclass
class ClassPatch:
    """What ``patch(cls)`` left on one class: ``original`` runs under the wrapper, ``own`` is restored."""

    config: CCEConfig
    original: Callable
    own: Callable | None


def instance_patch(model: Any) -> InstancePatch | None:
    own = getattr(model, "__dict__", {})
    if CONFIG_ATTR not in own:
        return None
    return InstancePatch(own[CONFIG_ATTR], own.get(PREVIOUS_ATTR))


def set_instance_patch(model: Any, record: InstancePatch | None) -> None:
    if record is None:
        model.__dict__.pop(CONFIG_ATTR, None)
        model.__dict__.pop(PREVIOUS_ATTR, None)
    else:
        model.__dict__[CONFIG_ATTR] = record.config
        model.__dict__[PREVIOUS_ATTR] = record.previous


def class_patch(cls: type, inherited: bool = False) -> ClassPatch | None:
    """The record of ``cls`` itself, or (``inherited``) of the nearest patched class in its MRO."""
    for klass in cls.__mro__ if inherited else (cls,):
        if CLASS_ORIGINAL_ATTR in klass.__dict__:
            return ClassPatch(klass.__dict__[CONFIG_ATTR], klass.__dict__[CLASS_ORIGINAL_ATTR],
                              klass.__dict__.get(CLASS_OWN_ATTR))
    return None


def set_class_patch(cls: type, record: ClassPatch | None) -> None:
    if record is None:
        for name in (CONFIG_ATTR, CLASS_ORIGINAL_ATTR, CLASS_OWN_ATTR):
            if name in cls.__dict__:
                delattr(cls, name)
    else:
        setattr(cls, CONFIG_ATTR, record.config)
        setattr(cls, CLASS_ORIGINAL_ATTR, record.original)
        setattr(cls, CLASS_OWN_ATTR, record.own)


def config_of(model: Any) -> CCEConfig:
    """The options that apply to ``model``: its own patch's, else its class's, else the defaults."""
    record = instance_patch(model)
    if record is not None:
        return record.config
    cls_record = class_patch(type(model), inherited=True)
    return cls_record.config if cls_record is not None else CCEConfig()


def original_forward(cls: type) -> Callable:
    """``cls.forward`` as it was before any class patch: the first forward on the MRO, or, where that is a class
    patch's wrapper, the stock forward the wrapper runs."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            if CLASS_ORIGINAL_ATTR in klass.__dict__:
                return klass.__dict__[CLASS_ORIGINAL_ATTR]
            return klass.__dict__["forward"]
    return cls.forward
