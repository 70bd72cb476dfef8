"""What the TRL hook installs in TRL's modules: ``add_fused_lm_head`` dispatching patched models to cce_patch's
fused head, and the trainers' ``__init__`` checked (the what and why of both: ``trl.py``, the integration's face).

Why a module apart from ``trl.py``: arming (``arming.py``) installs these wrappers whenever a model is patched,
and the face's ``CCE*Config`` classes arm in turn; with both in one file the two imported each other. Here
nothing imports the arming layer or the Trainer glue: ``on_module_loaded`` is handed to ``trl_hook.install``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import os
import sys
import types
import warnings
from typing import Any

import torch.nn as nn
from packaging.version import Version

from .extras import require
from .fused_head import (
    CCEBypassWarning,
    base_model,
    cce_config,
    fused_head_options,
    install_fused_head,
    is_cce_patched,
    watch_for_bypass,
)

logger = logging.getLogger("cce_patch")

__all__ = ["add_cce_fused_lm_head", "adopt_trl_head", "check_trainer", "CCEBypassWarning", "FUSED_HEAD_SINCE",
           "on_module_loaded", "trl_version"]

#: The first TRL release whose trainers go through ``add_fused_lm_head`` (1.14.0 has no such function).
FUSED_HEAD_SINCE = Version("1.15.0")
#: The trainer classes whose construction is checked (``on_module_loaded`` wraps their ``__init__``).
TRAINERS = ("SFTTrainer", "GRPOTrainer", "RLOOTrainer", "DPOTrainer", "KTOTrainer")
#: What the missing-extra error names.
_FEATURE = "cce_patch's TRL integration"


def trl_version() -> Version:
    return Version(importlib.metadata.version("trl"))


def add_cce_fused_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """TRL's ``add_fused_lm_head`` on cce_patch's kernel (same arguments): ``model(..., labels=labels,
    fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput``, computed by ``linear_log_probs`` without
    materialising the logits (``fused_head.py``)."""
    output_class = require("trl.trainer.utils", extra="trl", feature=_FEATURE).FusedCausalLMOutput
    install_fused_head(model, temperature, cast_lm_head_to_fp32, outputs, output_class=output_class)


def _trl_head_arguments(model: nn.Module) -> dict | None:
    """``add_fused_lm_head``'s arguments and the forward it wrapped, read from a TRL fused head installed on
    ``model`` (the closure of TRL 1.15-1.16's ``_fused_forward``), or None when there is none."""
    forward = base_model(model).__dict__.get("forward")
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    # functools.wraps gave the function the model's __qualname__; its code object still says what it is
    if code is None or code.co_name != "_fused_forward" or not code.co_filename.endswith(
            os.path.join("trl", "trainer", "utils.py")):
        return None
    fn = forward.__func__
    cells = dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ()), strict=True))
    wanted = ("original_forward", "temperature", "cast_lm_head_to_fp32", "outputs")
    if not all(name in cells for name in wanted):
        return None
    return {name: cells[name] for name in wanted}


def adopt_trl_head(model: nn.Module) -> bool:
    """Replace a TRL fused head found on a patched ``model`` by ours, with the same arguments; True if done.
    Safe only before the trainer prepares the model (accelerate wraps ``forward`` then)."""
    found = _trl_head_arguments(model)
    if found is None:
        return False
    base = base_model(model)
    base.forward = found.pop("original_forward")
    add_cce_fused_lm_head(base, **found)
    return True


# ----- arming: wrap TRL where it is defined ----------------------------------------------------------------------
_FACTORY = inspect.signature(add_cce_fused_lm_head)


def _dispatching_factory(original):
    """TRL's ``add_fused_lm_head`` for unpatched models, ours for patched ones."""

    @functools.wraps(original)
    def add_fused_lm_head(model, *args, **kwargs):
        if not is_cce_patched(model):
            return original(model, *args, **kwargs)
        try:
            bound = _FACTORY.bind(model, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"TRL {trl_version()} asked its fused LM head for {args or ''}{kwargs or ''}, which cce_patch's head "
                f"does not implement ({exc}); it serves TRL 1.15-1.16's (temperature, cast_lm_head_to_fp32, "
                "outputs). Unpatch the model to train with TRL's own head, or use a TRL release cce_patch supports."
            ) from None
        return add_cce_fused_lm_head(**bound.arguments)

    add_fused_lm_head._cce_trl_original = original
    return add_fused_lm_head


def _arm_fused_head(utils: types.ModuleType) -> None:
    original = vars(utils).get("add_fused_lm_head")
    if original is None or hasattr(original, "_cce_trl_original"):
        return  # TRL < 1.15 (no fused head), or armed already
    wrapped = _dispatching_factory(original)
    for name, module in list(sys.modules.items()):  # the trainers (and lazy modules) that imported it by name
        if (name == "trl" or name.startswith("trl.")) and module is not None and vars(module).get(
                "add_fused_lm_head") is original:
            module.add_fused_lm_head = wrapped
    logger.debug("cce_patch: TRL's add_fused_lm_head serves patched models with cce_patch's kernel")


def _checked_init(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        args, kwargs = _with_cce_callback(signature, self, args, kwargs)
        init(self, *args, **kwargs)
        check_trainer(self)

    __init__._cce_checked = True
    return __init__


def _arm_trainers(module: types.ModuleType) -> None:
    for name in TRAINERS:
        cls = vars(module).get(name)
        if isinstance(cls, type) and "__init__" in vars(cls) and not getattr(cls.__init__, "_cce_checked", False):
            cls.__init__ = _checked_init(cls.__init__)


def on_module_loaded(module: types.ModuleType) -> None:
    """Called by ``trl_hook`` right after a watched TRL module has executed (or at once if it had)."""
    if module.__name__ == "trl.trainer.utils":
        _arm_fused_head(module)
    else:
        _arm_trainers(module)


def _with_cce_callback(signature: inspect.Signature, trainer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``use_cce=True`` in the trainer's config adds its ``CCECallback`` (which patches the model at the end of
    ``Trainer.__init__``, before TRL installs its fused head), unless one is there already. The config says
    which callbacks that makes (``CCETrainingArguments.with_cce_callback``): this module arms TRL and so may not
    import the Trainer glue, which arms through ``arming.py``."""
    if "callbacks" not in signature.parameters:
        return args, kwargs
    try:
        bound = signature.bind_partial(trainer, *args, **kwargs)
    except TypeError:
        return args, kwargs  # let TRL report its own argument error
    training_args = bound.arguments.get("args")
    if not getattr(training_args, "use_cce", False) or not hasattr(training_args, "with_cce_callback"):
        return args, kwargs
    bound.arguments["callbacks"] = training_args.with_cce_callback(bound.arguments.get("callbacks"))
    return bound.args[1:], bound.kwargs


# ----- checks at trainer init and at run time -------------------------------------------------------------------
def _is_kind(trainer: object, name: str) -> bool:
    return any(k.__name__ == name and k.__module__.startswith("trl.") for k in type(trainer).__mro__)


def check_trainer(trainer: Any) -> None:
    """Say, at the end of a TRL trainer's ``__init__``, whether and how its patched models use our kernel;
    refuse what would fail at the first step."""
    kind = next((name for name in TRAINERS if _is_kind(trainer, name)), type(trainer).__name__)
    fused_protocol = "add_fused_lm_head" in vars(sys.modules.get("trl.trainer.utils", types.ModuleType("x")))
    for role in ("model", "ref_model"):
        model = getattr(trainer, role, None)
        if not isinstance(model, nn.Module) or not is_cce_patched(model):
            continue
        watch_for_bypass(model)
        if fused_protocol:
            _check_fused_head(kind, role, model)
        else:
            _check_logits_protocol(kind, role, model)
    if is_cce_patched(getattr(trainer, "model", None)) and kind == "SFTTrainer":
        args = trainer.args
        if getattr(trainer, "compute_loss_func", None) is not None:
            _bypass(f"{kind} with compute_loss_func computes the training loss from the model's full logits; "
                    "cce_patch's kernel computes only the metrics. Drop compute_loss_func to train on CCE.")
        elif getattr(args, "label_smoothing_factor", 0) > 0 and getattr(args, "loss_type", "nll") == "nll":
            _bypass(f"{kind} with label_smoothing_factor={args.label_smoothing_factor} smooths the model's full "
                    "logits: the loss does not come from cce_patch's kernel. Set label_smoothing in the model's "
                    "CCEConfig instead (patch(model, label_smoothing=...)) with a plain Trainer.")


def _check_fused_head(kind: str, role: str, model: nn.Module) -> None:
    if fused_head_options(model) is None and adopt_trl_head(model):
        logger.warning("%s: the %s carried TRL's own fused LM head; replaced by cce_patch's (same options)", kind, role)
    options = fused_head_options(model)
    if options is None:
        forward = base_model(model).__dict__.get("forward")
        if _trl_head_arguments(model) is None and forward is not None and kind in TRAINERS:
            _bypass(f"{kind}: the {role}'s forward is {getattr(forward, '__qualname__', forward)!r}, not a fused LM "
                    "head; TRL will call it with fused_lm_head=True and cce_patch's kernel is not in that path.")
        return
    logger.info("%s: the %s's fused LM head runs cce_patch's kernel (outputs=%s, temperature=%g)", kind, role,
                ",".join(options.outputs), options.temperature)


def _check_logits_protocol(kind: str, role: str, model: nn.Module) -> None:
    version = trl_version()
    if kind == "SFTTrainer" and role == "model":
        if not cce_config(model).return_logits:
            raise RuntimeError(
                f"TRL {version}'s SFTTrainer computes its entropy and mean_token_accuracy metrics from "
                "outputs.logits, which a model patched with cce_patch does not return in training (the first step "
                f"would fail). Upgrade to trl>={FUSED_HEAD_SINCE} (its fused LM head runs on cce_patch's kernel), or "
                "patch with return_logits=True (the logits are then built, which costs the memory CCE saves), or "
                "unpatch the model."
            )
        logger.warning("TRL %s's SFTTrainer reads outputs.logits: the patched model builds them (return_logits=True); "
                       "the loss is CCE's but the logit memory is not saved. trl>=%s avoids both.", version,
                       FUSED_HEAD_SINCE)
        return
    _bypass(f"TRL {version}'s {kind} computes the {role}'s per-token log-probs from its full logits (the model is "
            "called without labels), so cce_patch's kernel is not used. From trl>=" f"{FUSED_HEAD_SINCE} its fused LM "
            "head runs on cce_patch's kernel.")


def _bypass(message: str) -> None:
    warnings.warn(message, CCEBypassWarning, stacklevel=3)
