"""Sharded training: what a patched model needs under DDP, FSDP2, DeepSpeed ZeRO and tensor parallelism.

The patched forward reads the head weight in the ``*ForCausalLM`` forward and never calls ``lm_head`` (the call
would build the logits). Whatever gathers a sharded weight around ``lm_head``'s own forward therefore does not
run for it. Per stack (each verified on 2 CPU ranks by tests/test_distributed.py):

- DDP, DeepSpeed ZeRO-1/2: every rank holds the whole head; nothing to do.
- DeepSpeed ZeRO-3: nothing to do. Inside the engine's forward DeepSpeed marks every module's parameter dict
  ``_in_forward``; reading a partitioned parameter there gathers it and registers it as an external parameter
  of the module whose forward is running (the ``*ForCausalLM``), which also handles its gradient. The explicit
  ``deepspeed.zero.register_external_parameter`` this project once called is not needed (and its import,
  ``from deepspeed.zero import ...``, fails: ``deepspeed.zero`` is an attribute of deepspeed, not a module).
- Tensor parallel (``parallelize_module`` with a column-wise head, ``tp_plan="auto"``): the weight is a
  ``Shard(0)`` DTensor; the op runs vocab-parallel over its mesh (``ops/vocab_parallel.py``); nothing to do.
- FSDP2: when the head's parameters belong to the root's ``fully_shard`` group (accelerate's
  TRANSFORMER_BASED_WRAP, ``fully_shard`` per layer + root, root only), the root's pre-forward has gathered
  them. When they belong to another group (``lm_head`` in its own ``fully_shard``, or grouped with the final
  norm or the embedding; a tied head whose embedding has its own group) nobody gathers them: the weight the
  loss reads is the rank's ``Shard(0)`` DTensor shard. :func:`prepare_sharded_training` adds a forward hook on
  the decoder that unshards that group (``FSDPModule.unshard()``) just before the loss reads the weight. The
  group then stays unsharded through the loss's backward (the head is the last module of the forward and the
  first of the backward), and FSDP's end-of-backward callback reduce-scatters the head's gradient and reshards
  it, as it does for a group whose forward inputs needed no gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from ..models.heads import effective_head, unwrap_peft
from ..ops.vocab_parallel import has_dtensor

logger = logging.getLogger("cce_patch")

#: Attribute on the decoder module holding the installed hook's handle (idempotence).
_HOOK_ATTR = "_cce_sharded_head_hook"


def _head_weight(model: nn.Module) -> Any:
    """The weight the patched loss reads: the output embedding's (or the active PEFT ``modules_to_save`` copy's)."""
    head = model.get_output_embeddings()
    return effective_head(head).weight if head is not None else None


def fsdp_owner(model: nn.Module, param: Any) -> nn.Module | None:
    """The FSDP2 module whose ``fully_shard`` group manages ``param`` (None when FSDP2 does not manage it).

    A parameter shows up in ``parameters()`` of its owner and of every ancestor; the owner is the deepest
    ``FSDPModule`` holding it (for a group made of several modules, any of them: they share one state)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    holders = [m for m in model.modules() if isinstance(m, FSDPModule) and any(p is param for p in m.parameters())]
    return holders[-1] if holders else None  # modules() is pre-order: descendants come after their ancestors


class _UnshardHeadBeforeLoss:
    """Decoder forward hook: if the head weight is an FSDP2 shard here, unshard the group that owns it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._cached: tuple[Any, nn.Module | None] | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        weight = _head_weight(self.model)
        if weight is None or not has_dtensor(weight):  # gathered by its group, plain training, or not FSDP
            return
        if self._cached is None or self._cached[0] is not weight:
            owner = fsdp_owner(self.model, weight)
            self._cached = (weight, owner)
            if owner is not None:
                logger.info(
                    "FSDP2: the head weight of %s belongs to the fully_shard group of %s, not the root's; it is "
                    "unsharded after the decoder for the loss and resharded after backward",
                    type(self.model).__name__, type(owner).__name__,
                )
        owner = self._cached[1]
        if owner is not None:  # a tensor-parallel head is a DTensor too: the op runs it vocab-parallel
            owner.unshard()


def prepare_sharded_training(model: nn.Module) -> nn.Module:
    """Make a patched model train exactly under every layout in this module's docstring. Idempotent, cheap when
    nothing is sharded (the hook checks the weight's type once per forward), and safe to call before the model
    is wrapped (``fully_shard`` may come later: the hook decides at each forward).

    ``apply_cce`` (the Trainer flag and callback) calls it; call it yourself after ``cce_patch.patch(model)``
    when you shard the model with your own ``fully_shard`` calls.
    """
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or decoder is base:
        # Only FSDP2 groups outside the root need the hook; without it the op refuses such a layout by name.
        logger.warning("prepare_sharded_training: %s has no separate decoder module (get_decoder()); a head in an "
                       "FSDP2 group of its own will not be gathered for the loss", type(base).__name__)
        return model
    if getattr(decoder, _HOOK_ATTR, None) is None:
        setattr(decoder, _HOOK_ATTR, decoder.register_forward_hook(_UnshardHeadBeforeLoss(base)))
    return model


def release_sharded_training(model: nn.Module) -> None:
    """Remove the hook of :func:`prepare_sharded_training` (after ``unpatch``, where the stock forward gathers the
    head by calling it)."""
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    handle = getattr(decoder, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(decoder, _HOOK_ATTR)
