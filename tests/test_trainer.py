"""The use_cce Trainer flag: parsing, identical training to stock under gradient accumulation, when patching
happens (before accelerate's autocast wrapper), evaluation without logits, model_init and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from models_tiny import VOCAB, tiny_model
from transformers import HfArgumentParser, Trainer

from cce_patch import is_patched
from cce_patch.integrations.trainer import CCECallback, CCETrainer, CCETrainingArguments, cce_config_from_args


def _data(n=16, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (t,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 5, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _args(tmp_path, use_cce, **extra):
    base = dict(
        output_dir=str(tmp_path / str(use_cce)), use_cce=use_cce, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1,
        save_strategy="no", seed=0, data_seed=0,
    )
    return CCETrainingArguments(**{**base, **extra})


def _train(use_cce: bool, tmp_path, **extra):
    model = tiny_model("llama")
    trainer = Trainer(model=model, args=_args(tmp_path, use_cce, **extra), train_dataset=_data(), callbacks=[CCECallback()])
    trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _count_head_calls(model):
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}], ids=["plain", "checkpointing"])
def test_use_cce_matches_stock_with_accumulation(tmp_path, extra):
    stock, stock_losses = _train(False, tmp_path, **extra)
    cce, cce_losses = _train(True, tmp_path, **extra)
    assert is_patched(cce) and not is_patched(stock)
    torch.testing.assert_close(torch.tensor(cce_losses), torch.tensor(stock_losses), rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(cce.named_parameters(), stock.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_patched_before_accelerate_wraps_forward_for_autocast(tmp_path):
    """bf16 mixed precision: accelerate wraps forward in autocast at train(); the CCE forward must be inside it."""
    dtypes = {}
    for use_cce in (False, True):
        model = tiny_model("llama")
        seen = dtypes.setdefault(use_cce, set())
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o, seen=seen: seen.add(o.dtype))
        heads = _count_head_calls(model)
        Trainer(model=model, args=_args(tmp_path, use_cce, bf16=True, max_steps=1), train_dataset=_data(),
                callbacks=[CCECallback()]).train()
        assert (len(heads) == 0) == use_cce  # CCE never runs the head
    assert dtypes[True] == dtypes[False] == {torch.bfloat16}


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
    with pytest.raises(ValueError, match="JSON object"):
        CCETrainingArguments(output_dir="x", use_cce=True, cce_config="{impl: torch", report_to="none")


def test_prediction_loss_only_evaluates_without_logits(tmp_path):
    """With prediction_loss_only the plain Trainer + callback evaluates through CCE (the head never runs)."""
    stock = Trainer(model=tiny_model("llama"), args=_args(tmp_path, False), eval_dataset=_data(8, seed=1))
    expected = stock.evaluate()["eval_loss"]
    model = tiny_model("llama")
    heads = _count_head_calls(model)
    args = _args(tmp_path, True, prediction_loss_only=True)
    assert cce_config_from_args(args).train_only is False
    trainer = Trainer(model=model, args=args, eval_dataset=_data(8, seed=1), callbacks=[CCECallback()])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert heads == [] and is_patched(model)


def test_cce_trainer_skips_logits_in_loss_only_evaluation(tmp_path):
    """CCETrainer: evaluate() without compute_metrics asks for the loss alone (skip_logits); predict() keeps logits."""
    model = tiny_model("llama")
    heads = _count_head_calls(model)
    trainer = CCETrainer(model=model, args=_args(tmp_path, True), eval_dataset=_data(8, seed=1))
    assert is_patched(model) and cce_config_from_args(trainer.args).train_only
    loss = trainer.evaluate()["eval_loss"]
    assert heads == []
    stock = Trainer(model=tiny_model("llama"), args=_args(tmp_path, False), eval_dataset=_data(8, seed=1))
    assert loss == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-5)
    out = trainer.predict(_data(4, seed=2))
    assert out.predictions.shape == (4, 10, VOCAB) and len(heads) > 0  # logits when the caller wants them


def test_cce_trainer_patches_models_from_model_init(tmp_path):
    trainer = CCETrainer(model_init=lambda: tiny_model("llama"), args=_args(tmp_path, True, max_steps=1),
                         train_dataset=_data())
    first = trainer.model
    trainer.train()
    assert trainer.model is not first and is_patched(trainer.model)


def test_callback_respects_use_cce_false(tmp_path):
    model, _ = _train(False, tmp_path)
    assert not is_patched(model)
    copy.deepcopy(model)  # a patched-or-not model stays copyable


def test_model_that_cannot_be_patched_is_refused_at_init(tmp_path):
    # ProphetNet's loss is an n-gram loss built on log_softmax of the logits: cce_patch refuses it (with the reason)
    # rather than train a different loss
    config = transformers.ProphetNetConfig(vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                           num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
                                           num_decoder_attention_heads=2)
    model = transformers.ProphetNetForCausalLM(config)
    with pytest.raises(NotImplementedError, match="use_cce: cannot patch ProphetNetForCausalLM"):
        CCETrainer(model=model, args=_args(tmp_path, True), train_dataset=_data())
