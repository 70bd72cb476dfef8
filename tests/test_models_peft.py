"""PEFT models: LoRA on the decoder is transparent; the head is either handled exactly or refused."""

from __future__ import annotations

import copy

import pytest
import torch
from models_tiny import batch, tiny_model
from peft import LoraConfig, get_peft_model

from cce_patch import is_patched, patch, unpatch


def _peft(family: str, **lora):
    model = tiny_model(family)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)).train()


def _step(model, **extra):
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, ref):
    (got_out, got_grads), (ref_out, ref_grads) = got, ref
    torch.testing.assert_close(got_out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and got_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("family", "lora"),
    [
        ("llama", {"target_modules": ["q_proj", "v_proj", "gate_proj"]}),
        ("gemma2", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
        ("qwen3", {"target_modules": ["k_proj", "o_proj"]}),
        ("llama", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    ],
    ids=["llama-lora", "gemma2-lora", "qwen3-lora", "llama-modules_to_save-head"],
)
def test_peft_patched_matches_stock(family, lora):
    stock = _peft(family, **lora)
    patched = copy.deepcopy(stock)
    assert patch(patched) is patched and is_patched(patched) and is_patched(patched.get_base_model())
    outputs = []  # what the head module returned, if it ran: never a [tokens x vocab] tensor under CCE
    patched.get_base_model().lm_head.register_forward_hook(lambda m, i, o: outputs.append(o))
    got, ref = _step(patched), _step(stock)
    assert got[0].logits is None and not any(torch.is_tensor(o) for o in outputs)
    _assert_same(got, ref)
    assert all("lora_" in n or "modules_to_save" in n for n in got[1])  # only the adapters train
    if "modules_to_save" in lora:  # the trainable copy of the head is what got a gradient
        assert any("lm_head.modules_to_save" in n for n in got[1])
        ids, mask, labels = batch()
        with torch.no_grad(), patched.disable_adapter(), stock.disable_adapter():  # the original head, as PEFT
            got_off, ref_off = patched(input_ids=ids, labels=labels).loss, stock(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(got_off, ref_off, rtol=1e-5, atol=1e-6)
        assert abs(got_off - got[0].loss) > 1e-4  # disabling the adapters really changed the model
    patched.eval(), stock.eval()
    with torch.no_grad():  # train_only: evaluation is the stock forward
        ids, mask, labels = batch()
        assert torch.equal(patched(input_ids=ids, labels=labels).logits, stock(input_ids=ids, labels=labels).logits)
    unpatch(patched)
    assert not is_patched(patched)


def test_lora_on_lm_head_is_refused():
    model = _peft("llama", target_modules=["q_proj", "lm_head"])
    with pytest.raises(NotImplementedError, match="LoRA adapter on lm_head"):
        patch(model)
    assert not is_patched(model)


def test_lora_on_lm_head_added_after_patch_is_refused_at_forward():
    base = patch(tiny_model("llama")).train()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert is_patched(model)
    with pytest.raises(NotImplementedError, match="LoRA adapter on lm_head"):
        _step(model)


def test_trainable_tokens_on_head_match_stock():
    """PEFT's trainable tokens merge their rows into the head weight for one F.linear: CCE uses that weight."""
    stock = _peft("llama", target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 4]})
    patched = patch(copy.deepcopy(stock))
    got, ref = _step(patched), _step(stock)
    _assert_same(got, ref)
    assert got[0].logits is None and any("trainable_tokens_delta" in n for n in got[1])
