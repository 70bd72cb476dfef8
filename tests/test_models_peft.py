"""PEFT models: LoRA on the decoder is transparent; the head is either handled exactly or refused."""

from __future__ import annotations

import copy

import pytest
import torch
from models_tiny import batch, tiny_model
from peft import LoraConfig, get_peft_model

from cce_patch import is_patched, patch, unpatch


def _peft(family: str, **lora):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    return model.train()


def _step(model):
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj", "v_proj", "gate_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-decoder", "modules_to_save-head"],
)
def test_peft_patched_matches_stock(lora):
    stock = _peft("llama", **lora)
    patched = copy.deepcopy(stock)
    assert patch(patched) is patched and is_patched(patched)
    (ref, ref_grads), (got, got_grads) = _step(stock), _step(patched)
    assert got.logits is None
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and got_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if "modules_to_save" in lora:  # the trainable copy of the head is what got a gradient
        assert any("lm_head.modules_to_save" in n for n in got_grads)
    unpatch(patched)
    assert not is_patched(patched)


def test_lora_on_lm_head_is_refused():
    model = _peft("llama", target_modules=["q_proj", "lm_head"])
    with pytest.raises(NotImplementedError, match="LoRA adapter on lm_head"):
        patch(model)
