"""The Trainer logs what ``filter_eps`` skipped (``cce_filter_skipped_fraction``), through the callback and
``CCETrainer``; a model without the filter logs nothing of it."""

from __future__ import annotations

import pytest
from models_tiny import tiny_model
from test_trainer import _args, _data
from transformers import Trainer

from cce_patch import CCEConfig
from cce_patch.integrations.trainer import CCECallback, CCETrainer


def _logs(tmp_path, trainer_cls, config: CCEConfig) -> list[dict]:
    args = _args(tmp_path, True)
    model = tiny_model("llama")
    if trainer_cls is Trainer:
        trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[CCECallback(config)])
    else:
        trainer = CCETrainer(model=model, args=args, train_dataset=_data(), cce_config=config)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("trainer_cls", [Trainer, CCETrainer])
def test_filter_stats_are_logged(tmp_path, trainer_cls):
    logs = _logs(tmp_path, trainer_cls, CCEConfig(filter_eps=2.0**-10, impl="torch"))
    assert len(logs) == 3
    for entry in logs:
        # the tiny vocabulary is one tile, which holds targets: seen every step, never skippable
        assert entry["cce_filter_skipped_fraction"] == 0.0 and entry["cce_filter_max_row_dropped_mass"] == 0.0


def test_nothing_logged_without_the_filter(tmp_path):
    logs = _logs(tmp_path, Trainer, CCEConfig(impl="torch"))
    assert logs and not any("cce_filter_skipped_fraction" in entry for entry in logs)
