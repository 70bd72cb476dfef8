"""DeepSpeed ZeRO-3: let the patched forward read the head weight.

ZeRO-3 partitions every parameter and gathers a module's parameters only around that module's own forward.
The patched forward never calls ``lm_head``: it reads ``lm_head.weight`` from the ``*ForCausalLM`` forward, where
ZeRO-3 would leave it partitioned (an empty tensor). DeepSpeed's answer for a parameter used outside its owning
module is ``deepspeed.zero.register_external_parameter(module, param)``: the parameter is then gathered for, and
its gradient reduced after, ``module``'s forward. Registration needs parameters that are already ZeRO-3 ones
(``ds_id``), which holds when the model was built under ``zero.Init`` (the Trainer's ``zero3_init_flag``).
Without DeepSpeed this module does nothing.
"""

from __future__ import annotations

import logging
import sys

import torch.nn as nn

logger = logging.getLogger("cce_patch")


def register_head_with_zero3(model: nn.Module) -> bool:
    """Register the head weight (and bias) of a patched model as external parameters of its forward owner.

    Returns True when something was registered. A no-op unless deepspeed is imported and the head is a ZeRO-3
    parameter.
    """
    if "deepspeed" not in sys.modules:  # never import deepspeed just to find out it is unused
        return False
    from deepspeed.zero import register_external_parameter

    from ..models.registry import spec_for
    from .peft import effective_head, unwrap_peft

    base = unwrap_peft(model)
    head = effective_head(getattr(base, spec_for(base).head_attr))
    params = [p for p in (head.weight, head.bias) if p is not None and hasattr(p, "ds_id")]
    for param in params:
        register_external_parameter(base, param)
    if params:
        logger.info("ZeRO-3: head weight of %s registered as an external parameter of its forward", type(base).__name__)
    return bool(params)
