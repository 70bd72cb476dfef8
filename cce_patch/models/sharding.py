"""Sharded training: the head weight the loss reads, gathered where no sharding stack gathers it.

A patched forward reads the head weight at the head's call and never runs the head (running it would build the
logits: ``intercept.py`` shadows a plain projection head with a stand-in). Whatever gathers a sharded weight around
``lm_head``'s own forward therefore does not run for it. Per stack (each verified on 2 CPU ranks by
tests/test_distributed.py, with ``patch(model)`` alone):

- DDP, DeepSpeed ZeRO-1/2: every rank holds the whole head; nothing to do.
- DeepSpeed ZeRO-3: nothing to do. Inside the engine's forward DeepSpeed marks every module's parameter dict
  ``_in_forward``; reading a partitioned parameter there gathers it and registers it as an external parameter
  of the module whose forward is running (the ``*ForCausalLM``), which also handles its gradient.
- Tensor parallel (``parallelize_module`` with a column-wise head, ``tp_plan="auto"``): the weight is a
  ``Shard(0)`` DTensor; the op runs vocab-parallel over its mesh (``ops/vocab_parallel.py``); nothing to do.
- FSDP2: when the head's parameters belong to the root's ``fully_shard`` group (accelerate's
  TRANSFORMER_BASED_WRAP, ``fully_shard`` per layer + root, root only), the root's pre-forward has gathered
  them. When they belong to another group (torchtitan's layout: ``lm_head`` in a ``fully_shard`` of its own, or
  grouped with the final norm or the embedding; a tied head grouped with its embedding) nobody has: the weight
  is the rank's ``Shard(0)`` DTensor shard. :func:`gather_for_loss` then unshards that group
  (``FSDPModule.unshard()``) at the head's call, where the head's own pre-forward would have. The group stays
  unsharded through the loss's backward (the head is the last module of the forward and the first of the
  backward), and FSDP's end-of-backward callback reduce-scatters the head's gradient and reshards it, as it does
  for a group whose forward inputs needed no gradient.

The decision is made at each call from the weight itself, so it holds whether ``fully_shard`` ran before or after
``patch()``, for a class patch, inside a PeftModel, and for a model without ``get_decoder()``; nothing is installed
on the model, so ``unpatch()`` has nothing to remove.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch.nn as nn

from ..ops.dtensor_layouts import has_dtensor

logger = logging.getLogger("cce_patch")

#: id(weight) -> weak references to the weight and to the FSDP2 module that owns it, so that a training step asks
#: one dict instead of walking the model's modules. Keyed by id with the weight's own weakref checked (tensors
#: compare elementwise, so they cannot be WeakKeyDictionary keys); weak both ways: nothing is kept alive.
_owners: dict[int, tuple[weakref.ref, weakref.ref | None]] = {}


def fsdp_owner(model: nn.Module, param: object) -> nn.Module | None:
    """The FSDP2 module whose ``fully_shard`` group manages ``param`` (None when FSDP2 does not manage it).

    The owner is the deepest ``FSDPModule`` above a module that holds ``param`` (a tied weight has two holders;
    a group made of several modules has several ``FSDPModule`` s sharing one state: any of them will do). One
    pass over the modules: cheap next to a training step, and only taken when the weight is a DTensor."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    modules = dict(model.named_modules())
    owner, owner_depth = None, -1
    for path, module in modules.items():
        if not any(p is param for p in module._parameters.values()):
            continue
        parts = path.split(".") if path else []
        for depth in range(len(parts), owner_depth, -1):  # this holder's ancestors, deepest first
            above = modules.get(".".join(parts[:depth]))
            if isinstance(above, FSDPModule):
                owner, owner_depth = above, depth
                break
    return owner


@functools.cache
def _note(model_type: str, owner_type: str) -> None:
    logger.info("FSDP2: the head weight of %s belongs to the fully_shard group of %s, not the root's; cce_patch "
                "unshards it at the head's call for the loss, and FSDP reshards it after backward",
                model_type, owner_type)


def gather_for_loss(model: nn.Module, head: nn.Linear) -> None:
    """Before the loss reads ``head.weight``: if it is an FSDP2 shard (its group is not the root's, so no running
    forward gathered it), unshard the group that owns it, as the head's own pre-forward would have.

    Inert otherwise: a plain weight (unsharded, DDP, ZeRO, or gathered by the root) costs one type check; a
    tensor-parallel ``Shard(0)`` weight belongs to no FSDP group and stays sharded for the vocab-parallel op."""
    weight = head.weight
    if not has_dtensor(weight):
        return
    known = _owners.get(id(weight))
    if known is not None and known[0]() is weight:  # None: no FSDP2 group owns it (a tensor-parallel weight)
        owner = known[1]() if known[1] is not None else None
    else:  # FSDP2 and tensor parallelism register new parameter objects when they wrap: a new weight, a new walk
        owner = fsdp_owner(model, weight)
        _owners[id(weight)] = (weakref.ref(weight), weakref.ref(owner) if owner is not None else None)
    if owner is not None:
        _note(type(model).__name__, type(owner).__name__)
        owner.unshard()
