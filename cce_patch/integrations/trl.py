"""TRL: a patched model's fused LM head runs cce_patch's kernel, in every trainer that uses one.

What TRL does. From TRL 1.15 on, ``SFTTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer`` and
``KTOTrainer`` call ``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)``
in ``__init__``. It replaces ``model.forward`` by one that, called with ``fused_lm_head=True``, runs the
backbone and TRL's ``ChunkedLogProbFunction`` on ``lm_head.weight`` and returns a ``FusedCausalLMOutput``
(``loss``, per-token ``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``,
``label_mask``, ``aux_loss``). The model's own forward is never called there, so without this module a model
patched with cce_patch would train on TRL's kernel, silently.

What this module does. ``add_fused_lm_head`` is wrapped where TRL defines it and wherever a trainer module
imported it (``trl_wrappers.py``, installed by ``trl_hook.py`` when TRL is imported; patching a model arms the
hook: ``arming.py``). For a model
patched with cce_patch (the instance, through PEFT, or its class) the head installed is
:func:`add_cce_fused_lm_head`: the same protocol and output type, computed by ``cce_patch.linear_log_probs``
in one fused pass (no logits, exact gradients; ``fused_head.py``). Every other model gets TRL's own head,
untouched. The logits are TRL's head's: ``softcap(logit_scale * (h @ W.T + b)) / temperature``, with the soft
cap and the scale read from the config as TRL reads them.

Also checked when a TRL trainer is built (its ``__init__`` is wrapped the same way):

- a trainer whose model (or ``ref_model``) is patched reports which head it runs; a TRL fused head found on a
  patched model (installed through a reference cce_patch could not rewrap) is replaced by ours;
- TRL < 1.15: ``SFTTrainer`` reads ``outputs.logits`` for its metrics, which a patched model does not return
  in training: refused at init (unless ``return_logits=True``), never a crash at step 1; the other trainers
  compute their log-probs from full logits (the model is called without labels): a warning says our kernel is
  not used;
- paths that compute the loss from logits (``compute_loss_func``, ``label_smoothing_factor``) are named;
- at run time, a patched model whose head materialises ``[.., V]`` logits under autograd in training mode
  raises a :class:`CCEBypassWarning` once (``fused_head.watch_for_bypass``).

Options: ``CCESFTConfig`` (and the GRPO/RLOO/DPO/KTO ones) are TRL's configs with ``use_cce`` /
``cce_config``; a trainer given ``use_cce=True`` patches its model through ``CCECallback`` by itself.

Covered: TRL 1.15 and 1.16 (fused head: SFT, GRPO, RLOO, DPO, KTO, and any trainer that calls
``add_fused_lm_head``). TRL 0.x - 1.14: refusal (SFT) or warning (others), as above.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from .arming import arm
from .extras import require
from .trl_wrappers import (  # noqa: F401 - the integration's public names, defined where the hook needs them
    FUSED_HEAD_SINCE,
    TRAINERS,
    CCEBypassWarning,
    add_cce_fused_lm_head,
    adopt_trl_head,
    check_trainer,
    on_module_loaded,
    trl_version,
)

__all__ = ["add_cce_fused_lm_head", "adopt_trl_head", "cce_config_class", "check_trainer", "CCEBypassWarning",
           "FUSED_HEAD_SINCE", "trl_version"]

#: TRL's names of the configs that get a ``CCE`` twin with ``use_cce`` / ``cce_config``.
CONFIGS = ("SFTConfig", "GRPOConfig", "RLOOConfig", "DPOConfig", "KTOConfig")
#: What the missing-extra error names.
_FEATURE = "cce_patch's TRL integration"


# ----- configs with the use_cce flag ------------------------------------------------------------------------------
def cce_config_class(config_cls: type) -> type:
    """``config_cls`` (a TRL config, any TrainingArguments subclass) with ``use_cce`` and ``cce_config``, as in
    ``CCETrainingArguments``; the config's own defaults are kept. A TRL trainer given ``use_cce=True`` adds
    ``CCECallback`` by itself."""
    from .trainer import CCETrainingArguments

    arm()  # a trainer given use_cce=True must find TRL's trainers checked (arming.py)
    cls = type(f"CCE{config_cls.__name__}", (config_cls, CCETrainingArguments), {
        "__module__": __name__,
        "__doc__": f"``{config_cls.__name__}`` with cce_patch's ``use_cce`` and ``cce_config`` fields.",
    })
    return dataclasses.dataclass(cls)


@functools.cache
def _config_class(name: str) -> type:
    trl = require("trl", extra="trl", feature=_FEATURE)
    return cce_config_class(getattr(trl, name))


def __getattr__(name: str) -> Any:  # CCESFTConfig etc., built on first use (importing TRL's configs is slow)
    if name.startswith("CCE") and name[3:] in CONFIGS:
        return _config_class(name[3:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
