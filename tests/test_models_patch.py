"""patch(model) against stock transformers: same loss, same gradients, never the logits."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from models_tiny import GENERIC_FAMILIES, REGISTRY_FAMILIES, batch, tiny_model

import cce_patch
from cce_patch import CCEConfig, is_patched, patch, unpatch

ALL = REGISTRY_FAMILIES + GENERIC_FAMILIES


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", ALL)
def test_patched_matches_stock(family):
    stock = tiny_model(family).train()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref, got = _loss_and_grads(stock, **inputs), _loss_and_grads(patched, **inputs)
    assert got[0].logits is None and ref[0].logits is not None
    _assert_same(got, ref)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_num_items_in_batch_and_shift_labels(family):
    stock = tiny_model(family).train()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    n = (labels[..., 1:] != -100).sum() * 3  # as the Trainer counts across 3 accumulation steps
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    for extra in ({"num_items_in_batch": n}, {"shift_labels": shifted}):
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))


def test_gemma2_softcap_is_applied():
    model = patch(tiny_model("gemma2").train())
    ids, mask, labels = batch()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits well beyond the cap of 2.0, where tanh bites
        capped = model(input_ids=ids, labels=labels).loss
        model.config.final_logit_softcapping = None
        uncapped = model(input_ids=ids, labels=labels).loss
    assert not torch.allclose(capped, uncapped)


def test_logits_never_materialized_in_training():
    model = patch(tiny_model("llama").train())
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert calls == []


def test_eval_without_train_only_and_return_logits():
    stock = tiny_model("qwen2").eval()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    with torch.no_grad():
        ref = stock(input_ids=ids, labels=labels)
        got = patched(input_ids=ids, labels=labels)  # train_only: eval runs the stock forward
        torch.testing.assert_close(got.logits, ref.logits)
        patch(patched, train_only=False, return_logits=True)
        got = patched(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
        skip = patch(patched, train_only=True, return_logits=False)(input_ids=ids, labels=labels, skip_logits=True)
        assert skip.logits is None
        torch.testing.assert_close(skip.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_tuple_output_and_labels_on_other_dtype():
    model = patch(tiny_model("mistral").train())
    ids, mask, labels = batch()
    out = model(input_ids=ids, labels=labels.int(), return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


def test_generation_and_logits_to_keep_unchanged():
    stock = tiny_model("llama").eval()
    patched = patch(copy.deepcopy(stock), train_only=False)
    ids, _, _ = batch()
    with torch.no_grad():
        kept = patched(input_ids=ids, logits_to_keep=1).logits
        torch.testing.assert_close(kept, stock(input_ids=ids, logits_to_keep=1).logits)
        gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(ids, **gen), stock.generate(ids, **gen))


def test_unpatch_idempotence_and_isolation():
    a, b = tiny_model("llama"), tiny_model("llama")
    original = a.forward
    patch(a)
    patch(a, impl="torch")  # twice: options updated, still one patch
    assert is_patched(a) and not is_patched(b) and a._cce_config.impl == "torch"
    assert type(b).forward is transformers.LlamaForCausalLM.forward
    unpatch(a)
    assert not is_patched(a) and a.forward == original and "_cce_config" not in a.__dict__


def test_two_models_keep_their_own_options():
    a = patch(tiny_model("llama"), impl="torch", return_logits=True)
    b = patch(tiny_model("llama"), impl="auto")
    assert a._cce_config.return_logits and not b._cce_config.return_logits


def test_class_patch():
    try:
        patch("llama", impl="torch")
        assert is_patched(transformers.LlamaForCausalLM)
        model = tiny_model("llama").train()
        ids, mask, labels = batch()
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None
        unpatch(transformers.LlamaForCausalLM)
        assert not is_patched(transformers.LlamaForCausalLM)
        assert model(input_ids=ids, labels=labels).logits is not None
    finally:
        unpatch(transformers.LlamaForCausalLM)


def test_unsupported_architecture_is_refused():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(NotImplementedError, match="gpt2"):
        patch(transformers.GPT2LMHeadModel(config))


def test_unknown_logit_scaling_is_refused(monkeypatch):
    model = tiny_model("qwen3")
    model.config.logit_scale = 2.0
    with pytest.raises(NotImplementedError, match="qwen3"):
        patch(model)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown CCE option"):
        CCEConfig.from_dict({"imple": "torch"})
    with pytest.raises(ValueError, match="impl must be one of"):
        CCEConfig(impl="cuda")
    with pytest.raises(ValueError, match="unknown CCE option"):
        patch(tiny_model("llama"), chunk=3)


def test_version_gate():
    from cce_patch.models.patching import check_transformers_version

    check_transformers_version()
    with pytest.raises(RuntimeError, match="supports transformers"):
        check_transformers_version("4.40.0")


def test_logs_one_line(caplog):
    with caplog.at_level("INFO", logger="cce_patch"):
        patch(tiny_model("phi3"))
    assert any("phi3" in r.message and "impl=auto" in r.message for r in caplog.records)


def test_public_api():
    assert {"patch", "unpatch", "linear_cross_entropy", "CCEConfig"} <= set(cce_patch.__all__)
