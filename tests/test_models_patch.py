"""patch(model) against stock transformers: same loss, same gradients, never the logits."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from models_tiny import GENERIC_FAMILIES, REGISTRY_FAMILIES, batch, tiny_config, tiny_model

from cce_patch import is_patched, linear_cross_entropy, patch, unpatch
from cce_patch.models import spec_for

ALL = REGISTRY_FAMILIES + GENERIC_FAMILIES


def _loss_and_grads(model, *args, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **inputs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def _pair(family, **overrides):
    """A stock model with a sharpened head (logits of order 1, so soft caps and scales matter) and a patched copy."""
    stock = tiny_model(family, **overrides).train()
    with torch.no_grad():
        getattr(stock, spec_for(stock).head_attr).weight.mul_(10.0)
    return stock, patch(copy.deepcopy(stock))


@pytest.mark.parametrize("family", ALL)
def test_patched_matches_stock_train_and_eval(family):
    stock, patched = _pair(family)
    head = getattr(patched, spec_for(patched).head_attr)
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))  # the [tokens x vocab] logits would come from here
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))
    assert patched(**inputs).logits is None and calls == []

    stock.eval(), patched.eval()
    with torch.no_grad():
        ref = stock(**inputs)
        assert torch.equal(patched(**inputs).logits, ref.logits)  # train_only: eval is the stock forward
        calls.clear()
        got = patch(patched, train_only=False)(**inputs)  # eval through CCE
        assert got.logits is None and calls == []
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "gpt2"])
def test_num_items_in_batch_and_shift_labels(family):
    stock, patched = _pair(family)
    ids, mask, labels = batch()
    n = torch.tensor(int((labels[..., 1:] != -100).sum()) * 3)  # as the Trainer counts over 3 accumulation steps
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    for extra in ({"num_items_in_batch": n}, {"num_items_in_batch": int(n)}, {"shift_labels": shifted},
                  {"shift_labels": shifted, "num_items_in_batch": n}):
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))
    # shift_labels alone (no labels) also trains with CCE; stock needs `labels` to compute any loss
    alone = _loss_and_grads(patched, input_ids=ids, attention_mask=mask, shift_labels=shifted)
    _assert_same(alone, _loss_and_grads(stock, input_ids=ids, attention_mask=mask, labels=labels))


@pytest.mark.parametrize(
    ("family", "attr", "neutral"),
    [("gemma2", "final_logit_softcapping", None), ("gemma3_text", "final_logit_softcapping", None),
     ("cohere", "logit_scale", 1.0), ("granite", "logits_scaling", 1.0)],
)
def test_family_quirk_is_applied(family, attr, neutral):
    stock, patched = _pair(family)
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        with_quirk = patched(**inputs).loss
        torch.testing.assert_close(with_quirk, stock(**inputs).loss, rtol=1e-5, atol=1e-6)
        for model in (stock, patched):
            setattr(model.config, attr, neutral)
            if hasattr(model, attr):  # Cohere copies logit_scale onto the model at init
                setattr(model, attr, neutral)
        without = patched(**inputs).loss
        torch.testing.assert_close(without, stock(**inputs).loss, rtol=1e-5, atol=1e-6)
    assert abs(with_quirk - without) > 1e-2


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_head_bias_and_tied_embeddings(family):
    stock = tiny_model(family).train()  # untied: give the head a bias (scaled along with the logits for granite)
    stock.lm_head = torch.nn.Linear(32, stock.config.vocab_size, bias=True)
    with torch.no_grad():
        stock.lm_head.bias.normal_()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    got, ref = _loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs)
    assert "lm_head.bias" in got[1]
    _assert_same(got, ref)

    tied = tiny_model(family, tie_word_embeddings=True).train()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    patched = patch(copy.deepcopy(tied))
    _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(tied, **inputs))


def test_bf16_matches_stock_within_bf16_tolerance():
    stock = tiny_model("llama").train().to(torch.bfloat16)
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    (loss_got, grads_got), (loss_ref, grads_ref) = _loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs)
    assert loss_got.dtype == torch.float32 and loss_ref.dtype == torch.float32  # stock upcasts the logits too
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-2, atol=1e-2)
    for name, ref in grads_ref.items():
        err = (grads_got[name].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))


def test_eval_return_logits_and_skip_logits():
    stock = tiny_model("qwen2").eval()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    with torch.no_grad():
        ref = stock(input_ids=ids, labels=labels)
        patch(patched, train_only=False, return_logits=True)
        got = patched(input_ids=ids, labels=labels)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
        patch(patched, train_only=True, return_logits=False)
        skip = patched(input_ids=ids, labels=labels, skip_logits=True)  # Trainer, prediction_loss_only
        assert skip.logits is None
        torch.testing.assert_close(skip.loss, ref.loss, rtol=1e-5, atol=1e-6)
    patched.train()
    kept = patched(input_ids=ids, labels=labels, skip_logits=False)  # an explicit request for logits is honoured
    torch.testing.assert_close(kept.logits, ref.logits)


def test_tuple_output_positional_arguments_and_signature():
    stock, patched = _pair("mistral")
    ids, mask, labels = batch()
    assert inspect.signature(patched.forward) == inspect.signature(stock.forward)  # the Trainer reads it
    out = patched(input_ids=ids, labels=labels.int(), return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    hidden = patched(input_ids=ids, labels=labels, output_hidden_states=True).hidden_states  # carried through
    assert len(hidden) == patched.config.num_hidden_layers + 1
    positional = _loss_and_grads(patched, ids, mask, None, None, None, labels)  # llama-style parameter order
    _assert_same(positional, _loss_and_grads(stock, input_ids=ids, attention_mask=mask, labels=labels))
    stock, patched = _pair("gpt2")  # gpt2's order differs: (input_ids, past_key_values, attention_mask, ...)
    _assert_same(_loss_and_grads(patched, ids, None, mask, labels=labels),
                 _loss_and_grads(stock, ids, None, mask, labels=labels))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_and_logits_to_keep_unchanged(family):
    stock = tiny_model(family).eval()
    patched = patch(copy.deepcopy(stock), train_only=False)
    ids, _, _ = batch()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        kept = patched(input_ids=ids, logits_to_keep=1).logits
        assert kept.shape[1] == 1
        torch.testing.assert_close(kept, stock(input_ids=ids, logits_to_keep=1).logits)
        assert torch.equal(patched.generate(ids, **gen), stock.generate(ids, **gen))
        patched.train(), stock.train()  # no labels: stock behaviour in training mode too
        torch.testing.assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_unpatch_idempotence_and_isolation():
    a, b = tiny_model("llama"), tiny_model("llama")
    original = a.forward
    patch(a)
    patch(a, impl="torch")  # twice: options updated, still one patch
    assert is_patched(a) and not is_patched(b) and a._cce_config.impl == "torch"
    assert type(b).forward is transformers.LlamaForCausalLM.forward and "forward" not in b.__dict__
    unpatch(a)
    assert not is_patched(a) and a.forward == original and "_cce_config" not in a.__dict__
    assert "forward" not in a.__dict__
    unpatch(a)  # no-op


def test_two_models_keep_their_own_options():
    a = patch(tiny_model("llama"), impl="torch", return_logits=True)
    b = patch(tiny_model("llama"), impl="auto")
    assert a._cce_config.return_logits and not b._cce_config.return_logits


@pytest.mark.parametrize("target", ["llama", transformers.LlamaForCausalLM])
def test_class_patch(target):
    original = transformers.LlamaForCausalLM.forward
    ids, mask, labels = batch()
    try:
        patch(target, impl="torch")
        assert is_patched(transformers.LlamaForCausalLM) and is_patched("llama")
        model = transformers.LlamaForCausalLM(tiny_config("llama")).train()  # made after the patch
        stock = copy.deepcopy(model)
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None and model._cce_config.impl == "torch"
        patch(model, impl="auto")  # an instance patch over a class patch, then undone
        unpatch(model)
        assert model(input_ids=ids, labels=labels).logits is None
        unpatch(target)
        assert not is_patched(transformers.LlamaForCausalLM)
        assert transformers.LlamaForCausalLM.forward is original
        torch.testing.assert_close(stock(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)
    finally:
        unpatch(transformers.LlamaForCausalLM)


def _bart():
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32)
    return transformers.BartForCausalLM(config)  # has .model and .lm_head, but scores labels unshifted


def _mixtral():
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    return transformers.MixtralForCausalLM(config)  # adds a router auxiliary loss


@pytest.mark.parametrize(("make", "model_type"), [(_bart, "bart"), (_mixtral, "mixtral")])
def test_non_standard_architectures_are_refused(make, model_type):
    model = make()
    with pytest.raises(NotImplementedError, match=model_type):
        patch(model)
    with pytest.raises(NotImplementedError, match=model_type):
        patch(model_type)
    assert not is_patched(model) and not is_patched(type(model))


def test_unknown_model_type_and_bad_targets():
    with pytest.raises(NotImplementedError, match="no_such_model"):
        patch("no_such_model")
    with pytest.raises(TypeError, match="patch expects"):
        patch(42)
    with pytest.raises(TypeError, match="patch expects"):
        patch(int)


def test_config_errors():
    from cce_patch import CCEConfig

    with pytest.raises(ValueError, match="unknown CCE option"):
        CCEConfig.from_dict({"imple": "torch"})
    with pytest.raises(ValueError, match="impl must be one of"):
        CCEConfig(impl="cuda")
    with pytest.raises(ValueError, match="label_smoothing"):
        CCEConfig(label_smoothing=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        CCEConfig(mode="fast")
    with pytest.raises(ValueError, match="speed_chunk_bytes"):
        CCEConfig(mode="speed", speed_chunk_bytes=-1)
    with pytest.raises(ValueError, match="unknown CCE option"):
        patch(tiny_model("llama"), chunk=3)
    config = CCEConfig.from_dict({"impl": "torch", "train_only": False})
    assert config.replace(return_logits=True) == CCEConfig(impl="torch", train_only=False, return_logits=True)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_speed_mode_matches_stock(family):
    """CCEConfig(mode="speed"): the gradients formed in the forward pass equal stock's, with and without
    the Trainer's num_items_in_batch (sum reduction, divided outside the op)."""
    stock, patched = _pair(family)
    patch(patched, mode="speed")
    ids, mask, labels = batch()
    n = torch.tensor(int((labels[..., 1:] != -100).sum()) * 2)
    for extra in ({}, {"num_items_in_batch": n}):
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))


def test_speed_mode_falls_back_where_unsupported(caplog):
    """One rule decides where speed mode applies (ops/options.speed_mode_problem): the op raises on it, the
    config's op options fall back to memory mode with one warning per reason."""
    from cce_patch import CCEConfig
    from cce_patch.config import _warn_once

    _warn_once.cache_clear()
    speed = CCEConfig(mode="speed", speed_chunk_bytes=2**20)
    assert speed.op_options(torch.bfloat16, None)["mode"] == "speed"
    assert speed.op_options(torch.bfloat16, None)["speed_chunk_bytes"] == 2**20
    with caplog.at_level("WARNING", logger="cce_patch"):
        assert speed.op_options(torch.float16, None)["mode"] == "memory"
        assert speed.op_options(torch.float16, None)["mode"] == "memory"
        assert speed.replace(label_smoothing=0.1).op_options(torch.bfloat16, 30.0)["mode"] == "memory"
    messages = [r.message for r in caplog.records if r.name.startswith("cce_patch")]
    assert len(messages) == 2 and "fp16" in messages[0] and "label_smoothing" in messages[1]
    assert CCEConfig(mode="memory").op_options(torch.float16, None)["mode"] == "memory"
    assert CCEConfig().op_options(torch.float16, None)["mode"] == "auto"  # the default: the op decides, silently
    e = torch.randn(2, 3, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="fp16"):  # the op raises on the same rule
        linear_cross_entropy(e, torch.randn(5, 8, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.long),
                             mode="speed")


def test_config_and_op_share_option_ranges():
    from cce_patch import CCEConfig

    CCEConfig(label_smoothing=1.0)  # the op accepts [0, 1], as F.cross_entropy does; so does the config
    for bad in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            CCEConfig(label_smoothing=bad)
    e, c, t = torch.randn(2, 3, 8), torch.randn(5, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        linear_cross_entropy(e, c, t, label_smoothing=1.5)


def test_label_smoothing_option():
    stock, patched = _pair("llama")
    ids, mask, labels = batch()
    patch(patched, label_smoothing=0.1)
    with torch.no_grad():
        got = patched(input_ids=ids, labels=labels).loss
        logits = stock(input_ids=ids).logits[:, :-1].float()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                label_smoothing=0.1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_version_gate(monkeypatch):
    from cce_patch.models.patching import check_transformers_version

    check_transformers_version()
    with pytest.raises(RuntimeError, match="supports transformers"):
        check_transformers_version("4.40.0")
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(RuntimeError, match="found 6.0.0"):
        patch(tiny_model("llama"))


def test_logs_one_line(caplog):
    with caplog.at_level("INFO", logger="cce_patch"):
        patch(tiny_model("phi3"))
    lines = [r.message for r in caplog.records if r.name == "cce_patch"]
    assert len(lines) == 1 and "phi3" in lines[0] and "impl=auto" in lines[0]


def test_public_api():
    import cce_patch

    assert {"patch", "unpatch", "is_patched", "linear_cross_entropy", "CCEConfig", "__version__"} <= set(cce_patch.__all__)
