"""Liger-Kernel's non-loss kernels composed with our loss, on CUDA: the documented order
(``apply_liger_kernel_to_<family>(fused_linear_cross_entropy=False, model=model)``, then ``cce_patch.patch``)
gives stock's loss and gradients.

fp32: equal to stock within fp32 rounding. bf16: the composed model's error against the fp32 stock model is at
most twice stock bf16's own (Liger's kernels and ours round differently from stock, not worse). Liger patches
process-wide attributes; monkeypatch restores them after each test.

The Trainer's one-flag composition (``use_cce=True`` with ``use_liger_kernel=True``, Liger's defaults otherwise:
integrations/trainer.py turns its losses off) trains a tiny model a few steps, compared with a stock Trainer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models_tiny import batch, tiny_model

from cce_patch import patch
from cce_patch.models.foreign_losses import detect_foreign_loss

pytestmark = pytest.mark.gpu

APPLY = {"llama": "apply_liger_kernel_to_llama", "gemma2": "apply_liger_kernel_to_gemma2"}
PATCHED = {  # what each apply function may replace process-wide
    "llama": ("transformers.models.llama.modeling_llama", ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", ("apply_rotary_pos_emb", "Gemma2RMSNorm", "Gemma2MLP")),
}


@pytest.fixture
def restore(monkeypatch):
    import importlib

    def snapshot(family: str) -> None:
        module = importlib.import_module(PATCHED[family][0])
        for name in PATCHED[family][1]:
            monkeypatch.setattr(module, name, getattr(module, name))
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)

    return snapshot


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _models(family: str, dtype: torch.dtype):
    stock = tiny_model(family).to("cuda", dtype).train()
    with torch.no_grad():  # logits of order 1, so the head (and Gemma 2's soft cap) matter
        stock.lm_head.weight.mul_(10.0)
    return stock, copy.deepcopy(stock)


def _compose(model, family: str):
    # Imported here, not at collection: importing Liger replaces sys.modules["transformers"] (see
    # tests/test_foreign_losses.py), and GPU tests are collected in CPU runs too.
    liger = pytest.importorskip("liger_kernel.transformers")
    getattr(liger, APPLY[family])(fused_linear_cross_entropy=False, cross_entropy=False, model=model)
    patch(model)
    assert detect_foreign_loss(model) is None
    return model


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_liger_kernels_with_our_loss_equal_stock_fp32(family, restore):
    restore(family)
    stock, composed = _models(family, torch.float32)
    ids, mask, labels = (x.cuda() for x in batch())
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss_s, grads_s, _ = _loss_and_grads(stock, **inputs)  # before Liger touches the modeling module
    _compose(composed, family)
    assert composed.model.norm.forward.__func__.__module__.startswith("liger_kernel")  # Liger's RMSNorm runs
    loss_c, grads_c, out = _loss_and_grads(composed, **inputs)
    assert out.logits is None and "Liger" not in type(out.loss.grad_fn).__name__  # our loss ran, not Liger's
    torch.testing.assert_close(loss_c, loss_s, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_s.keys()
    for name in grads_s:
        assert _rel(grads_c[name], grads_s[name]) < 1e-4, name


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_liger_kernels_with_our_loss_bf16_no_worse_than_stock(family, restore):
    restore(family)
    ref, _ = _models(family, torch.float32)
    stock = copy.deepcopy(ref).to(torch.bfloat16)
    composed = copy.deepcopy(stock)
    ids, mask, labels = (x.cuda() for x in batch())
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss_r, grads_r, _ = _loss_and_grads(ref, **inputs)
    loss_s, grads_s, _ = _loss_and_grads(stock, **inputs)
    _compose(composed, family)
    loss_c, grads_c, _ = _loss_and_grads(composed, **inputs)
    assert abs(float(loss_c - loss_r)) <= 2 * abs(float(loss_s - loss_r)) + 2e-3 * float(loss_r)
    for name in grads_r:
        assert _rel(grads_c[name], grads_r[name]) <= 2 * _rel(grads_s[name], grads_r[name]) + 1e-3, name


# ----- the Trainer: use_cce=True with use_liger_kernel=True, Liger's defaults otherwise --------------------------


def _trainer_run(tmp_path, family: str, bf16: bool, **flags):
    """Four AdamW steps of a tiny ``family`` model (fp32 weights, bf16 autocast with ``bf16``) through
    ``CCETrainer`` on variable-length rows padded per batch: the logged losses, the first step's gradients
    (read just before the optimizer step) and how many losses our op computed."""
    from models_tiny import VOCAB
    from transformers import TrainerCallback

    from cce_patch.integrations.trainer import CCETrainer, CCETrainingArguments
    from cce_patch.models.intercept import observe

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in range(16):
        ids = torch.randint(3, VOCAB, (8 + n % 5,), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda t, v: torch.cat([t, t.new_full((width - len(t),), v)])  # noqa: E731
        return {"input_ids": torch.stack([pad(r["input_ids"], 0) for r in batch]),
                "labels": torch.stack([pad(r["labels"], -100) for r in batch]),
                "attention_mask": torch.stack([pad(torch.ones_like(r["input_ids"]), 0) for r in batch])}

    grads: dict[str, torch.Tensor] = {}

    class FirstGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not grads:
                grads.update({n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                              if p.grad is not None})

    model, _ = _models(family, torch.float32)
    args = CCETrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                learning_rate=1e-3, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                                data_seed=0, bf16=bf16, **flags)
    trainer = CCETrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                         callbacks=[FirstGrads()])
    with observe() as calls:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, grads, sum(c.losses for c in calls)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_trainer_use_cce_with_use_liger_kernel_trains_as_stock(tmp_path, family, bf16, restore):
    """One flag pair, Liger's defaults otherwise: its decoder kernels run, our loss computes every step (counted),
    and the losses and first-step gradients equal stock's (fp32: to rounding; bf16: within bf16 noise)."""
    import importlib

    restore(family)
    module = importlib.import_module(PATCHED[family][0])
    stock_losses, stock_grads, stock_ours = _trainer_run(tmp_path / "stock", family, bf16)
    losses, grads, ours = _trainer_run(tmp_path / "both", family, bf16, use_cce=True, use_liger_kernel=True)
    assert (stock_ours, ours) == (0, 4)  # stock: no CCE call; composed: our loss once per step
    assert getattr(module, PATCHED[family][1][1]).__module__.startswith("liger_kernel")  # Liger's RMSNorm in place
    loss_tol, grad_tol = (2e-2, 5e-2) if bf16 else (1e-4, 1e-3)
    assert len(losses) == len(stock_losses) == 4
    for a, b in zip(losses, stock_losses, strict=True):
        assert abs(a - b) <= loss_tol * abs(b), (losses, stock_losses)
    assert grads.keys() == stock_grads.keys()
    for name, g in stock_grads.items():
        assert _rel(grads[name], g) < grad_tol, name


# ----- patch() over Liger's defaults (its fused loss on): what runs ------------------------------------------------

LIGER_LOSS_MODULE = {"llama": "liger_kernel.transformers.model.llama",
                     "gemma2": "liger_kernel.transformers.model.gemma2"}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patch_over_liger_defaults_refuses_training_as_it_says(family, restore, monkeypatch):
    """``apply_liger_kernel_to_<family>(model=model)`` with its defaults, then ``patch(model)``: the message says
    neither loss trains; a training call runs Liger's loss (counted) and not ours (counted), and is refused."""
    import importlib

    from cce_patch.models.intercept import observe

    restore(family)
    liger = pytest.importorskip("liger_kernel.transformers")
    loss_module = importlib.import_module(LIGER_LOSS_MODULE[family])
    liger_losses: list[int] = []
    real = loss_module.LigerForCausalLMLoss
    monkeypatch.setattr(loss_module, "LigerForCausalLMLoss",
                        lambda *a, **k: liger_losses.append(1) or real(*a, **k))
    model, _ = _models(family, torch.bfloat16)
    getattr(liger, APPLY[family])(model=model)
    patch(model)
    assert "neither loss trains" in detect_foreign_loss(model)
    ids, mask, labels = (x.cuda() for x in batch())
    with observe() as calls, pytest.raises(NotImplementedError):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    assert liger_losses == [1] and [c.losses for c in calls] == [0]
