"""Sharded training needs no call of its own: ``cce_patch.patch(model)`` trains exactly under DDP, FSDP2 (every
grouping of the head, torchtitan's included), DeepSpeed ZeRO and tensor parallelism (``models/sharding.py`` says
how, layout by layout).

:func:`prepare_sharded_training` and :func:`release_sharded_training` were once needed for an FSDP2 head in a
``fully_shard`` group of its own (they installed and removed a hook on the decoder). They remain as harmless
names, so code written for those versions runs unchanged: both do nothing.
"""

from __future__ import annotations

import torch.nn as nn

from ..models.sharding import fsdp_owner

__all__ = ["fsdp_owner", "prepare_sharded_training", "release_sharded_training"]


def prepare_sharded_training(model: nn.Module) -> nn.Module:
    """No longer needed, and does nothing: ``patch(model)`` gathers an FSDP2-sharded head for the loss by itself
    (``models/sharding.py``). Returns ``model``, as it always did."""
    return model


def release_sharded_training(model: nn.Module) -> None:
    """No longer needed, and does nothing: ``patch(model)`` leaves nothing on the model for ``unpatch`` to keep."""
