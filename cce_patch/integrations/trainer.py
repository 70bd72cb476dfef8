"""The ``use_cce`` Trainer flag, in the shape of transformers' own ``use_liger_kernel`` / ``liger_kernel_config``.

``CCETrainingArguments`` adds the two fields, which ``HfArgumentParser`` reads from YAML or the command line.
Two ways to honour them, sharing :func:`apply_cce`:

- ``CCECallback``: a plain ``transformers.Trainer`` user adds one line, ``callbacks=[CCECallback()]``.
- ``CCETrainer``: a drop-in ``Trainer`` that also asks the patched model for the loss alone whenever evaluation
  only needs the loss (``skip_logits``, as the Trainer does for Liger), and patches models made by ``model_init``.

Token metrics (``cce_token_metrics=True``, ``CCETrainer``): the training loss then comes from the fused LM head
(``fused_head.py``: the loss and, in the same pass, each token's entropy and whether its label is the argmax),
and the Trainer logs ``mean_token_accuracy`` and ``entropy`` over the counted tokens of each logging window, as
TRL's SFTTrainer does, without logits.

When to patch matters. ``accelerate`` wraps ``model.forward`` in autocast when it prepares the model for mixed
precision, which happens inside ``Trainer.train()`` before ``on_train_begin``. Patching after that would replace
the autocast wrapper and run the decoder without autocast; so the callback patches in ``on_init_end`` (the end of
``Trainer.__init__``, before any wrapping), and the wrapper later wraps the patched forward. What gets patched is
the model the Trainer holds: the ``*ForCausalLM`` itself or a ``PeftModel`` (``patch`` finds its base model);
DDP / FSDP / DeepSpeed wrap that same object later, so their wrappers are never touched (``distributed.py`` says
what each sharded layout needs).

With transformers' ``use_liger_kernel=True`` as well, ``use_cce`` keeps Liger's decoder kernels (RMSNorm, RoPE,
SwiGLU/GeGLU, ...) and turns its losses off: ``liger_kernel_config`` gets ``fused_linear_cross_entropy=False`` and
``cross_entropy=False`` (logged), set when the arguments are built (``CCETrainingArguments``) and again by the
callback at the end of ``Trainer.__init__``, before the Trainer applies Liger (in ``train()`` in transformers 5.x).
Liger's fused-loss forward, installed on the instance, would replace or sit under ours; and under ours it computes
its loss from ``lm_head.weight`` itself, so patched training calls are refused (``foreign_losses.py``). A foreign
fused loss found on the model when training starts is therefore an error, not a silent swap of losses.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..config import CCEConfig
from ..models.foreign_losses import foreign_losses
from ..models.patching import is_patched
from .arming import arm, patch
from .extras import require
from .fused_head import base_model, cce_config, fused_head_options, install_fused_head

require("accelerate", extra="trainer", feature="cce_patch's Trainer flag (transformers' Trainer runs on accelerate)")

logger = logging.getLogger("cce_patch")

#: Liger-Kernel's loss options (``apply_liger_kernel_to_*`` arguments) that ``use_cce`` turns off.
LIGER_LOSS_OPTIONS = ("fused_linear_cross_entropy", "cross_entropy")


def liger_config_without_loss(config: dict | str | None) -> dict:
    """``liger_kernel_config`` with Liger's losses off and its other options as given (a JSON string from the
    command line is read). Liger's apply functions take only the options they have, so the two keys are harmless
    for a family without one of them."""
    if isinstance(config, str):
        config = json.loads(config) if config.strip() else {}
    return {**(config or {}), **{name: False for name in LIGER_LOSS_OPTIONS}}


def compose_with_liger(args: Any) -> bool:
    """With ``use_liger_kernel`` on, set Liger's loss options off in ``args.liger_kernel_config`` (in place) and
    say so once; True when it changed anything. The Trainer passes that dict to Liger's
    ``_apply_liger_kernel_to_instance``."""
    if not getattr(args, "use_liger_kernel", False):
        return False
    before = getattr(args, "liger_kernel_config", None)
    after = liger_config_without_loss(before)
    if before == after:
        return False
    args.liger_kernel_config = after
    kept = {k: v for k, v in after.items() if k not in LIGER_LOSS_OPTIONS}
    logger.info("use_cce with use_liger_kernel: Liger-Kernel's decoder kernels%s with cce_patch's loss "
                "(liger_kernel_config: fused_linear_cross_entropy=False, cross_entropy=False)",
                f" ({kept})" if kept else "")
    return True


def refuse_foreign_loss(model: nn.Module) -> None:
    """Raise when another library's loss would stop a ``use_cce`` run from training with CCE: its fused-loss
    forward on the model (replacing ours, or under ours), or its cross-entropy in place of
    ``torch.nn.functional.cross_entropy`` (Liger's ``cross_entropy=True``: a patched model's training calls are
    then refused). ``foreign_losses.py`` says which, as observed."""
    found = foreign_losses(model)
    if found:
        raise RuntimeError(
            f"use_cce: {'; '.join(map(str, found))}. Apply Liger-Kernel with fused_linear_cross_entropy=False and "
            "cross_entropy=False (with the Trainer: use_liger_kernel=True and use_cce=True turn them off by "
            "themselves) or train without use_cce"
        )


@dataclass
class CCETrainingArguments(TrainingArguments):
    """TrainingArguments with the CCE switch. ``cce_config`` is a dict (YAML) or a JSON string (CLI)."""

    use_cce: bool = field(default=False, metadata={"help": "Compute the LM loss with Cut Cross-Entropy (cce_patch)."})
    cce_config: dict | str | None = field(
        default=None,
        metadata={"help": 'CCE options as a dict or JSON string, e.g. \'{"impl": "triton"}\' (see cce_patch.CCEConfig).'},
    )
    cce_token_metrics: bool = field(
        default=False,
        metadata={"help": "CCETrainer: log mean_token_accuracy and entropy of the trained tokens, computed by the "
                          "kernel in the loss pass (no logits)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.cce_config, str):
            try:
                self.cce_config = json.loads(self.cce_config)
            except json.JSONDecodeError as exc:
                raise ValueError(f"cce_config must be a JSON object string, got {self.cce_config!r}") from exc
        if self.cce_config is not None and not isinstance(self.cce_config, dict):
            raise ValueError(f"cce_config must be a dict or a JSON object string, got {type(self.cce_config).__name__}")
        CCEConfig.from_dict(self.cce_config)  # refuse unknown option names at parse time, not mid-run
        if self.use_cce:
            compose_with_liger(self)  # before any Trainer applies Liger, whichever transformers version

    def with_cce_callback(self, callbacks: list | None) -> list:
        """``callbacks`` with a ``CCECallback`` added unless one is there: what a trainer given these arguments
        must run. TRL's trainers ask the arguments (``trl_wrappers.py`` may not import this module)."""
        return with_cce_callback(callbacks)


def cce_config_from_args(args: Any) -> CCEConfig:
    """CCEConfig from training arguments.

    With ``prediction_loss_only`` the Trainer never reads logits in evaluation or prediction, so the patched
    model may use CCE in eval mode too (``train_only=False``): evaluation then builds no logits either.
    """
    config = CCEConfig.from_dict(getattr(args, "cce_config", None) or {})
    if getattr(args, "prediction_loss_only", False):
        config = config.replace(train_only=False)
    return config


def apply_cce(model: nn.Module, args: Any = None, config: CCEConfig | None = None) -> nn.Module:
    """Patch the model a Trainer holds (a ``*ForCausalLM`` or a ``PeftModel``). Idempotent.

    ``config`` wins over ``args.cce_config``. Raises ``NotImplementedError`` (with the model type) for an
    architecture cce_patch cannot patch, before any training step runs.
    """
    if model is None:
        raise RuntimeError("use_cce is set but the Trainer has no model to patch")
    config = config or cce_config_from_args(args)
    try:
        patch(model, config)
    except NotImplementedError as exc:
        raise NotImplementedError(f"use_cce: cannot patch {type(model).__name__}: {exc}") from exc
    return model


def filter_log_entries(model: nn.Module | None) -> dict[str, float]:
    """``cce_filter_skipped_fraction`` and ``cce_filter_max_row_dropped_mass`` of the training steps since the last
    log, for a model patched with ``filter_eps`` (its config's counter, drained here); {} otherwise."""
    counter = getattr(cce_config(model), "filter_counter", None) if model is not None else None
    stats = counter.drain() if counter is not None else None
    return stats.log_entries() if stats is not None and stats.tiles_seen else {}


class CCECallback(TrainerCallback):
    """Patches the Trainer's model with CCE; ``callbacks=[CCECallback()]`` on a plain ``Trainer``.

    With ``CCETrainingArguments`` it follows ``use_cce``; with plain ``TrainingArguments`` adding the callback
    is the opt-in. ``config`` overrides the arguments' ``cce_config``.
    """

    def __init__(self, config: CCEConfig | None = None) -> None:
        arm()  # asking for a patch: a TRL trainer built with this callback is checked too (arming.py)
        self.config = config
        self.logs_token_metrics = False  # set by CCETrainer, which logs them; a plain Trainer cannot

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # End of Trainer.__init__: before accelerate wraps forward for autocast, and before evaluate()/predict().
        if self._enabled(args) and model is not None:
            compose_with_liger(args)  # plain TrainingArguments: the Trainer applies Liger later, in train()
            apply_cce(model, args, self.config)
            refuse_foreign_loss(model)
            if getattr(args, "cce_token_metrics", False) and not self.logs_token_metrics:
                logger.warning("cce_token_metrics: only CCETrainer logs them; a plain Trainer with CCECallback does not")

    def _enabled(self, args: Any) -> bool:
        return bool(getattr(args, "use_cce", True))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A model the Trainer received after __init__ (e.g. the callback was added later) is patched here.
        if self._enabled(args) and model is not None and not is_patched(model):
            logger.warning("use_cce: patching at train start; the model was not patched when the Trainer was built")
            apply_cce(model, args, self.config)
        if self._enabled(args) and model is not None:
            refuse_foreign_loss(model)  # e.g. a Liger loss the Trainer installed in train(), after our patch

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        # With filter_eps, what the filter skipped. A plain Trainer runs the reporters registered before this
        # callback first, so they miss it (the history and later ones get it); CCETrainer.log adds it for all.
        if logs is not None and "loss" in logs and "cce_filter_skipped_fraction" not in logs:
            entries = filter_log_entries(model)
            logs.update(entries)
            if entries and state.log_history:
                state.log_history[-1].update(entries)


def with_cce_callback(callbacks: list | None, config: CCEConfig | None = None) -> list:
    """``callbacks`` (instances or classes, as a Trainer takes them) plus ``CCECallback(config)`` unless one is
    there already."""
    callbacks = list(callbacks or [])
    if not any(isinstance(c, CCECallback) or c is CCECallback for c in callbacks):
        callbacks.append(CCECallback(config))
    return callbacks


class CCETrainer(Trainer):
    """A ``Trainer`` that honours ``args.use_cce`` by itself.

    Beyond the callback it (1) patches each model ``model_init`` makes (hyper-parameter search, re-init at
    ``train()``), (2) passes ``skip_logits=True`` to the patched model whenever the Trainer evaluates for
    the loss alone (``evaluate()`` without ``compute_metrics``), so evaluation never builds logits either, and
    (3) with ``cce_token_metrics``, logs the token accuracy and entropy of training, computed in the loss pass.
    """

    #: the per-token fields the token metrics need from the fused head
    TOKEN_METRIC_OUTPUTS = ("log_probs", "entropy", "is_top1")

    def __init__(self, *args: Any, cce_config: CCEConfig | None = None, **kwargs: Any) -> None:
        self._cce_overrides = cce_config
        self._token_sums: torch.Tensor | None = None  # (counted tokens, entropy sum, correct) of the log window
        callbacks = with_cce_callback(kwargs.pop("callbacks", None), cce_config)
        for cb in callbacks:
            if isinstance(cb, CCECallback):
                cb.logs_token_metrics = True
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._install_token_metrics(self.model)

    def _use_cce(self) -> bool:
        return bool(getattr(self.args, "use_cce", True))

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self._use_cce():
            apply_cce(model, self.args, self._cce_overrides)
            self._install_token_metrics(model)
        return model

    def _install_token_metrics(self, model: nn.Module | None) -> None:
        """With ``cce_token_metrics``, the patched model's training loss comes from the fused LM head, which
        computes the metrics' per-token values in the same pass (``fused_head.py``)."""
        if not (getattr(self.args, "cce_token_metrics", False) and self._use_cce() and is_patched(model)):
            return
        if fused_head_options(model) is None:
            install_fused_head(base_model(model), outputs=self.TOKEN_METRIC_OUTPUTS)

    def _token_metrics_step(self, inputs: dict) -> bool:
        """Whether this loss goes through the fused head: training, labels given, and no loss computed from
        logits by the Trainer (label smoothing, ``compute_loss_func``), which keeps its own path."""
        return (
            getattr(self.args, "cce_token_metrics", False) and self.model.training and "labels" in inputs
            and self.label_smoother is None and self.compute_loss_func is None
            and fused_head_options(self.model) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._token_metrics_step(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, {**inputs, "fused_lm_head": True}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        sums = torch.stack([
            outputs.label_mask.sum().float(), outputs.entropy.detach().sum().float(), outputs.is_top1.sum().float(),
        ])
        self._token_sums = sums if self._token_sums is None else self._token_sums + sums
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs gain ``mean_token_accuracy`` and ``entropy``: over every counted token of the window
        since the last log, summed over processes (token-weighted, like TRL's)."""
        if self._token_sums is not None and "loss" in logs:
            totals = self.accelerator.reduce(self._token_sums, reduction="sum")
            self._token_sums = None
            count, entropy, correct = totals.tolist()
            logs["mean_token_accuracy"] = correct / count if count > 0 else 0.0
            logs["entropy"] = entropy / count if count > 0 else 0.0
        if "loss" in logs:
            logs.update(filter_log_entries(self.model))
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if prediction_loss_only and self._use_cce() and is_patched(self.model) and "labels" in inputs:
            inputs = {**inputs, "skip_logits": True}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
