"""Patch state: every ``_cce_*`` attribute a patch leaves on a model instance or a class, read and written here.

An instance patch stores an :class:`InstancePatch` record in the instance's ``__dict__`` and replaces its
``forward`` with a ``PatchedForward`` (``forward.py``). Both are ordinary picklable objects, so
``torch.save(model)`` / ``pickle`` / ``copy.deepcopy`` give a copy that is patched the same way (its forward
object refers to the copy). A class patch stores a :class:`ClassPatch` record on the class itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import CCEConfig

INSTANCE_ATTR = "_cce_patch"
CLASS_ATTR = "_cce_class_patch"


@dataclass
class InstancePatch:
    """``config``: the options; ``previous``: the instance's own ``forward`` before the patch (None: the
    class's), restored by ``unpatch``."""

    config: CCEConfig
    previous: Any = None


@dataclass
class ClassPatch:
    """``config``: the options; ``original``: ``cls.forward`` before the patch; ``own``: the forward defined on
    the class itself before the patch (None when it was inherited), restored by ``unpatch``."""

    config: CCEConfig
    original: Callable
    own: Callable | None


def instance_patch(model: Any) -> InstancePatch | None:
    return getattr(model, "__dict__", {}).get(INSTANCE_ATTR)


def set_instance_patch(model: Any, record: InstancePatch | None) -> None:
    if record is None:
        model.__dict__.pop(INSTANCE_ATTR, None)
    else:
        model.__dict__[INSTANCE_ATTR] = record


def class_patch(cls: type, inherited: bool = False) -> ClassPatch | None:
    """The record of ``cls`` itself, or (``inherited``) of the nearest patched class in its MRO."""
    for klass in cls.__mro__ if inherited else (cls,):
        record = klass.__dict__.get(CLASS_ATTR)
        if record is not None:
            return record
    return None


def set_class_patch(cls: type, record: ClassPatch | None) -> None:
    if record is None:
        if CLASS_ATTR in cls.__dict__:
            delattr(cls, CLASS_ATTR)
    else:
        setattr(cls, CLASS_ATTR, record)


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
            record = klass.__dict__.get(CLASS_ATTR)
            return record.original if record is not None else klass.__dict__["forward"]
    return cls.forward
