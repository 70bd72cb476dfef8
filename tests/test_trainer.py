"""The use_cce Trainer flag: parsing, and identical training to stock under gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
from models_tiny import VOCAB, tiny_model
from transformers import HfArgumentParser, Trainer

from cce_patch import is_patched
from cce_patch.integrations.trainer import CCECallback, CCETrainingArguments, cce_config_from_args


def _data(n=16, t=10):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (t,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 5, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _train(use_cce: bool, tmp_path, **extra):
    model = tiny_model("llama")
    args = CCETrainingArguments(
        output_dir=str(tmp_path / str(use_cce)), use_cce=use_cce, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
        save_strategy="no", seed=0, data_seed=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[CCECallback()])
    trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
def test_use_cce_matches_stock_with_accumulation(tmp_path, extra):
    stock, stock_losses = _train(False, tmp_path, **extra)
    cce, cce_losses = _train(True, tmp_path, **extra)
    assert is_patched(cce) and not is_patched(stock)
    torch.testing.assert_close(torch.tensor(cce_losses), torch.tensor(stock_losses), rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(cce.named_parameters(), stock.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_flag_parses_from_cli_and_dict():
    parser = HfArgumentParser(CCETrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--use_cce", "true", "--cce_config", '{"impl": "torch"}', "--report_to", "none"]
    )
    assert args.use_cce and args.cce_config == {"impl": "torch"}
    (args,) = parser.parse_dict({"output_dir": "x", "use_cce": True, "cce_config": {"return_logits": True}, "report_to": "none"})
    assert cce_config_from_args(args).return_logits
    with pytest.raises(ValueError, match="unknown CCE option"):
        CCETrainingArguments(output_dir="x", use_cce=True, cce_config={"bogus": 1}, report_to="none")


def test_prediction_loss_only_evaluates_without_logits():
    args = CCETrainingArguments(output_dir="x", use_cce=True, prediction_loss_only=True, report_to="none")
    assert cce_config_from_args(args).train_only is False


def test_callback_respects_use_cce_false(tmp_path):
    model, _ = _train(False, tmp_path)
    assert not is_patched(model)
    copy.deepcopy(model)  # a patched-or-not model stays copyable
