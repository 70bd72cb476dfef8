"""The patched forward: the family's own forward, wrapped, never replaced.

When CCE applies to a call (``labels`` given, and the model is training, or ``train_only=False``, or the
Trainer asks for the loss alone with ``skip_logits=True``), the stock forward runs inside an
:class:`~cce_patch.models.intercept.Interception`: its head returns deferred logits and its own loss code
computes the loss through ``linear_cross_entropy``; ``logits`` is None in the output (or the real logits with
``return_logits=True``), in the position stock gives it. Otherwise the stock forward runs untouched, so
generation, caches, ``logits_to_keep`` and ``shift_labels``-only calls behave exactly as stock.

An instance's patched forward is a :class:`PatchedForward` object (picklable: it holds the model, not a
closure). A class patch installs :func:`class_forward`'s wrapper on the class. Both expose the stock forward
as ``__wrapped__``, so ``inspect.signature`` (which the Trainer reads to keep dataset columns and to decide
whether to pass ``num_items_in_batch``) sees the family's own signature.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .heads import effective_head
from .intercept import Interception
from .registry import resolve_head
from .state import config_of, original_forward

logger = logging.getLogger("cce_patch")

#: ids of the models whose forward is inside an interception in this context (a subclass's forward that calls
#: ``super().forward`` reaches a patched forward twice: the inner call runs as written).
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("cce_patch_active", default=frozenset())


def _labels(call: Callable, args: tuple, kwargs: dict) -> Any:
    if "labels" in kwargs or not args:
        return kwargs.get("labels")
    try:
        return inspect.signature(call).bind_partial(*args, **kwargs).arguments.get("labels")
    except TypeError:  # the stock forward raises its own error for these arguments
        return None


def run_patched(model: nn.Module, call: Callable, args: tuple, kwargs: dict) -> Any:
    """Run ``call`` (the stock forward, bound) with CCE where it applies."""
    skip_logits = kwargs.pop("skip_logits", None)  # the Trainer's "loss only" request; stock forwards never see it
    active = _ACTIVE.get()
    if id(model) in active:
        return call(*args, **kwargs)
    config = config_of(model)
    wants_cce = skip_logits if skip_logits is not None else (model.training or not config.train_only)
    if not wants_cce or _labels(call, args, kwargs) is None:
        return call(*args, **kwargs)
    head = resolve_head(model)
    vocab = effective_head(head).out_features  # refuses an adapter added to the head after patching
    token = _ACTIVE.set(active | {id(model)})
    try:
        with Interception(model, head, vocab, config) as site:
            output = call(*args, **kwargs)
        return site.finish(output)
    finally:
        _ACTIVE.reset(token)


class PatchedForward:
    """The ``forward`` of a patched instance. ``previous`` is the instance's own forward before the patch (None:
    the class's stock forward)."""

    __name__ = "forward"

    def __init__(self, model: nn.Module, previous: Callable | None = None) -> None:
        self.model, self.previous = model, previous

    @property
    def __wrapped__(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return types.MethodType(original_forward(type(self.model)), self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] is self.model:  # accelerate's unwrap_model(keep_fp32_wrapper=False) rebinds us as a method
            args = args[1:]
        return run_patched(self.model, self.__wrapped__, args, kwargs)

    def __repr__(self) -> str:
        return f"<cce_patch forward of {type(self.model).__name__}>"


@functools.cache
def _warn_subclass(cls: type, patched: type) -> None:
    logger.warning(
        "%s overrides forward, so the class patch of %s does not apply to it: patch(%s) or patch(model) trains it "
        "with CCE", cls.__name__, patched.__name__, cls.__name__,
    )


def class_forward(cls: type, original: Callable) -> Callable:
    """The forward a class patch installs on ``cls``: ``original`` (the stock forward), wrapped."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if type(self).forward is not forward and id(self) not in _ACTIVE.get():
            # a subclass with its own forward reached us through super(): its forward is not the patched one
            _warn_subclass(type(self), cls)
            kwargs.pop("skip_logits", None)
            return original(self, *args, **kwargs)
        return run_patched(self, types.MethodType(original, self), args, kwargs)

    functools.update_wrapper(forward, original)
    return forward
