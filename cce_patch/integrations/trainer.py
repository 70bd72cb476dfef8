"""The ``use_cce`` Trainer flag, in the shape of transformers' own ``use_liger_kernel`` / ``liger_kernel_config``.

``CCETrainingArguments`` adds the two fields, which ``HfArgumentParser`` reads from YAML or the command line.
``CCECallback`` applies them when training starts: a plain ``transformers.Trainer`` user adds one line,
``callbacks=[CCECallback()]``. The callback patches the model the Trainer holds (the unwrapped model, or the
``PeftModel``, whose base model ``patch`` finds), so DDP/accelerate wrappers are never touched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from ..config import CCEConfig
from ..models.patching import patch

logger = logging.getLogger("cce_patch")


@dataclass
class CCETrainingArguments(TrainingArguments):
    """TrainingArguments with the CCE switch. ``cce_config`` is a dict (YAML) or a JSON string (CLI)."""

    use_cce: bool = field(default=False, metadata={"help": "Compute the LM loss with Cut Cross-Entropy (cce_patch)."})
    cce_config: dict | str | None = field(
        default=None,
        metadata={"help": 'CCE options as a dict or JSON string, e.g. \'{"impl": "triton"}\' (see cce_patch.CCEConfig).'},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.cce_config, str):
            try:
                self.cce_config = json.loads(self.cce_config)
            except json.JSONDecodeError as exc:
                raise ValueError(f"cce_config must be a JSON object string, got {self.cce_config!r}") from exc
        CCEConfig.from_dict(self.cce_config)  # refuse unknown option names at parse time


def cce_config_from_args(args: Any) -> CCEConfig:
    """CCEConfig from training arguments. With ``prediction_loss_only`` evaluation also skips the logits."""
    config = CCEConfig.from_dict(getattr(args, "cce_config", None) or {})
    if getattr(args, "prediction_loss_only", False):
        config = config.replace(train_only=False)
    return config


class CCECallback(TrainerCallback):
    """Patches the Trainer's model with CCE at the start of training.

    With ``CCETrainingArguments`` it follows ``use_cce``; with plain ``TrainingArguments`` adding the callback
    is the opt-in. ``config`` overrides the arguments' ``cce_config``.
    """

    def __init__(self, config: CCEConfig | None = None) -> None:
        self.config = config

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not getattr(args, "use_cce", True):
            return
        if model is None:
            raise RuntimeError("CCECallback needs the Trainer to pass its model to callbacks")
        patch(model, self.config or cce_config_from_args(args))
