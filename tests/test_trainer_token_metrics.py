"""CCETrainer's ``cce_token_metrics``: token accuracy and entropy logged from the loss pass, without logits, equal
to what the stock model's logits give, and a training run that is otherwise unchanged."""

from __future__ import annotations

import pytest
import torch
from models_tiny import VOCAB, tiny_model

import cce_patch.ops.token_stats as token_stats
from cce_patch.integrations.fused_head import fused_head_options
from cce_patch.integrations.trainer import CCETrainer, CCETrainingArguments


def _dataset(n: int = 12, t: int = 10):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (t,), generator=g)
        labels = ids.clone()
        labels[: 2 + i % 3] = -100  # a masked prompt of varying length
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(t, dtype=torch.long)})
    return rows


def _train(metrics: bool, lr: float, monkeypatch=None):
    model = tiny_model("llama")
    args = CCETrainingArguments(
        output_dir="unused", use_cce=True, cce_config={"impl": "torch"}, cce_token_metrics=metrics, max_steps=3,
        per_device_train_batch_size=4, logging_steps=1, learning_rate=lr, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = CCETrainer(model=model, args=args, train_dataset=_dataset())
    batches = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, **kwargs):
        batches.append({k: v.clone() for k, v in inputs.items()})
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return trainer, logs, batches


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    forward = token_stats.TokenStatsFunction.forward

    def counted(ctx, e2d, c, bias, targets, spec, stats, backend):
        calls.append(stats)
        return forward(ctx, e2d, c, bias, targets, spec, stats, backend)

    monkeypatch.setattr(token_stats.TokenStatsFunction, "forward", staticmethod(counted))
    return calls


def test_metrics_equal_the_stock_logits_ones(kernel_calls):
    trainer, logs, batches = _train(metrics=True, lr=0.0)  # constant weights: every step is the initial model's
    assert fused_head_options(trainer.model) is not None
    assert len(kernel_calls) == 3 and all(s.entropy and s.is_top1 for s in kernel_calls)
    stock = tiny_model("llama")
    for log, inputs in zip(logs, batches, strict=True):
        with torch.no_grad():
            logits = stock(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        log_p = torch.log_softmax(logits.double(), -1)
        entropy = -(log_p.exp() * log_p).sum(-1)[mask].mean().item()
        accuracy = (logits.argmax(-1) == labels)[mask].double().mean().item()
        loss = torch.nn.functional.cross_entropy(logits.double()[mask], labels[mask]).item()
        assert log["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert log["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert log["loss"] == pytest.approx(loss, rel=1e-5)


def test_training_is_unchanged_by_the_metrics():
    _, with_metrics, _ = _train(metrics=True, lr=1e-3)
    _, without, _ = _train(metrics=False, lr=1e-3)
    assert "mean_token_accuracy" not in without[0]
    for a, b in zip(with_metrics, without, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_label_smoothing_is_refused_with_metrics():
    args = CCETrainingArguments(output_dir="unused", use_cce=True, cce_config={"impl": "torch", "label_smoothing": 0.1},
                                cce_token_metrics=True, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        CCETrainer(model=tiny_model("llama"), args=args, train_dataset=_dataset())
