"""Arm the TRL integration (``trl.py``) whenever TRL is imported, without importing TRL ourselves.

Why an import hook: TRL's trainers install their fused LM head inside ``__init__`` (``add_fused_lm_head``),
from a function each trainer module imported by name. A user who patches a model and then builds a trainer
must get cce_patch's kernel without any further step, and cce_patch must not pay for importing TRL (seconds)
in programs that never use it. So ``install()`` arms a finder on ``sys.meta_path`` that does nothing but wait
for the TRL modules below: right after one of them has executed, the handler it was given wraps what it needs
in it (``trl_wrappers.on_module_loaded``, handed over by ``arming.py``: this module imports nothing of the
package, so the hook and what it installs do not import each other). Modules already imported are handled at
once, so TRL may be imported before or after.

When: ``install()`` runs when a model is patched (``arming.py``: ``cce_patch.patch``, the Trainer flag, the
``CCE*Config`` classes), never at ``import cce_patch``, which changes nothing outside the package.

The wrappers act only on models patched with cce_patch; every other model, and TRL itself, behave exactly as
without cce_patch. A failure to arm is logged, never raised into TRL's import.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("cce_patch")

#: The modules whose loading arms the integration: TRL's fused-head factory, and the trainers checked at init.
WATCHED = (
    "trl.trainer.utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.kto_trainer",
)


#: What runs on each watched module once it has executed: set by the first ``install``.
_handler: Callable[[types.ModuleType], None] | None = None


def _arm(module: types.ModuleType) -> None:
    if _handler is None:
        return
    try:
        _handler(module)
    except Exception as exc:  # noqa: BLE001 - never break TRL's import; say so instead
        logger.warning("cce_patch could not arm its TRL integration on %s: %s: %s", module.__name__,
                       type(exc).__name__, exc)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders for the spec and makes the loader
    call ``_arm`` after the module's code has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module, _run=run):
            _run(module)
            _arm(module)

        loader.exec_module = exec_module  # the loader object is this module's own (one per spec)
        return spec


def install(handler: Callable[[types.ModuleType], None]) -> None:
    """Arm the integration once per process: ``handler`` runs now on the watched modules already imported, later
    on the rest. Called by ``arming.arm`` (a patch, the Trainer flag, a ``CCE*Config``) with the same handler
    each time; calling it again only re-applies it, which the handler makes a no-op."""
    global _handler
    _handler = handler
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name in WATCHED:  # utils first: the trainers' checks expect the fused head to be wrapped already
        module = sys.modules.get(name)
        if module is not None:
            _arm(module)
