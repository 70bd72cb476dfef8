"""Liger-Kernel's non-loss kernels composed with our loss, on CUDA: the documented order
(``apply_liger_kernel_to_<family>(fused_linear_cross_entropy=False, model=model)``, then ``cce_patch.patch``)
gives stock's loss and gradients.

fp32: equal to stock within fp32 rounding. bf16: the composed model's error against the fp32 stock model is at
most twice stock bf16's own (Liger's kernels and ours round differently from stock, not worse). Liger patches
process-wide attributes; monkeypatch restores them after each test.
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
