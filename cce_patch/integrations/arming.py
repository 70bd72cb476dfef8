"""``cce_patch.patch`` as users call it: the model room's ``patch``, then the integrations armed that hook a
library process-wide.

Why at patch time and not at import: ``import cce_patch`` must change nothing outside the package (no
``sys.meta_path`` finder, no warnings filter, no logging handler, no torch setting), as the peers' imports do
not. A process that patches a model has asked for cce_patch's kernel wherever that model's loss is computed,
TRL's fused LM head included (``trl.py``), so patching is what arms the TRL hook (``trl_hook.py``) with the
wrappers it installs (``trl_wrappers.py``): TRL modules already imported are wrapped at once, the others when
they load. The wrappers act only on patched models, so
arming changes nothing for any other model.

Why a layer of its own: the model room may not import this one (``tests/test_layering.py``), so
``cce_patch.models.patch`` cannot arm; the facade exports this ``patch`` instead. The other ways of asking for a
patch arm too: ``apply_cce`` and ``CCECallback`` (the Trainer flag) and the ``CCE*Config`` classes of ``trl.py``.
"""

from __future__ import annotations

from typing import Any

from .. import models
from ..config import CCEConfig
from . import trl_hook


def arm() -> None:
    """Arm the integrations that wait for a library's import (today TRL's). Idempotent and cheap; imports
    nothing outside the package."""
    from . import trl_wrappers  # imports no TRL; lazily so that ``import cce_patch`` stays light

    trl_hook.install(trl_wrappers.on_module_loaded)


def patch(target: Any, config: CCEConfig | None = None, **options: Any) -> Any:
    patched = models.patch(target, config, **options)
    arm()
    return patched


# help(cce_patch.patch) shows the model room's arguments (one text, not a copy) and what this adds.
patch.__doc__ = (models.patch.__doc__ or "") + """
    The public ``cce_patch.patch`` also arms the TRL integration after a patch that succeeded, so that a TRL
    trainer built on the patched model runs cce_patch's kernel (``import cce_patch`` alone arms nothing).
"""
