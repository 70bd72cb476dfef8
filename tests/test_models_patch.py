"""patch(model) against stock transformers: same loss, same gradients, never the logits."""

from __future__ import annotations

import copy
import inspect
import io
import logging
import pickle

import pytest
import torch
import transformers
from models_tiny import FAMILIES, VOCAB, batch, tiny_config, tiny_model

from cce_patch import is_patched, linear_cross_entropy, patch, unpatch
from cce_patch.models import config_of, spec_for
from cce_patch.models.intercept import observe


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
        stock.get_output_embeddings().weight.mul_(10.0)
    return stock, patch(copy.deepcopy(stock))


def _head_outputs(model):
    """What the head module returns, call by call (deferred logits under CCE, tensors otherwise)."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o))
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_stock_train_and_eval(family):
    stock, patched = _pair(family)
    seen = _head_outputs(patched)
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with observe() as calls:
        _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))
    assert [c.losses for c in calls] == [1]  # the loss came through linear_cross_entropy
    assert patched(**inputs).logits is None and not any(torch.is_tensor(o) for o in seen)

    stock.eval(), patched.eval()
    with torch.no_grad():
        ref = stock(**inputs)
        assert torch.equal(patched(**inputs).logits, ref.logits)  # train_only: eval is the stock forward
        seen.clear()
        got = patch(patched, train_only=False)(**inputs)  # eval through CCE
        assert got.logits is None and not any(torch.is_tensor(o) for o in seen)
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


def test_shift_labels_without_labels_is_stock():
    """Stock computes a loss only when `labels` is given; `shift_labels` alone gives none, patched or not."""
    stock, patched = _pair("llama")
    ids, mask, labels = batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    got, ref = patched(input_ids=ids, shift_labels=shifted), stock(input_ids=ids, shift_labels=shifted)
    assert got.loss is None and ref.loss is None
    torch.testing.assert_close(got.logits, ref.logits)


def test_label_the_shift_never_scores_is_accepted():
    """Position 0 is never a target after the causal shift: stock accepts any value there, so does CCE."""
    stock, patched = _pair("llama")
    ids, mask, labels = batch()
    labels[:, 0] = VOCAB + 7  # out of range, but dropped by the shift
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))
    labels[0, 3] = VOCAB + 7  # a scored position: refused (stock's F.cross_entropy raises too)
    with pytest.raises((ValueError, IndexError)):
        patched(**inputs)


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


def test_cpu_autocast_gives_the_head_what_autocast_gives_f_linear():
    """Under bf16 autocast stock's head runs in bf16; the deferred head takes the same bf16 operands."""
    stock, patched = _pair("llama")
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16), observe() as calls:
        got, ref = patched(**inputs).loss, stock(**inputs).loss
    assert got.dtype == ref.dtype == torch.float32
    assert calls[0].losses == 1
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


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


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_tuple_output_keeps_stock_positions(family):
    """return_dict=False: out[1] is the logits slot (None where CCE built none), the rest where stock has it."""
    stock, patched = _pair(family)
    ids, mask, labels = batch()
    ref = stock(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    got = patched(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    assert isinstance(got, tuple) and len(got) == len(ref) and got[1] is None
    torch.testing.assert_close(got[0], ref[0])
    assert type(got[2]) is type(ref[2])  # the cache, where stock put it
    patch(patched, return_logits=True)
    got = patched(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)


def test_positional_arguments_and_signature():
    stock, patched = _pair("mistral")
    ids, mask, labels = batch()
    assert inspect.signature(patched.forward) == inspect.signature(stock.forward)  # the Trainer reads it
    hidden = patched(input_ids=ids, labels=labels, output_hidden_states=True).hidden_states  # carried through
    assert len(hidden) == patched.config.num_hidden_layers + 1
    for family in ("mistral", "gpt2"):  # gpt2's order differs: (input_ids, past_key_values, attention_mask, ...)
        stock, patched = _pair(family)
        names = list(inspect.signature(stock.forward).parameters)
        values = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        args = [values.get(name) for name in names[: names.index("labels") + 1]]  # labels by position too
        _assert_same(_loss_and_grads(patched, *args), _loss_and_grads(stock, **values))


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
    assert is_patched(a) and not is_patched(b) and config_of(a).impl == "torch"
    assert type(b).forward is transformers.LlamaForCausalLM.forward and "forward" not in b.__dict__
    unpatch(a)
    assert not is_patched(a) and a.forward == original and config_of(a).impl == "auto"
    assert "forward" not in a.__dict__ and not any(k.startswith("_cce") for k in a.__dict__)
    unpatch(a)  # no-op


def test_two_models_keep_their_own_options():
    a = patch(tiny_model("llama"), impl="torch", return_logits=True)
    b = patch(tiny_model("llama"), impl="auto")
    assert config_of(a).return_logits and not config_of(b).return_logits


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
        assert out.logits is None and config_of(model).impl == "torch" and not is_patched(model)
        patch(model, impl="auto")  # an instance patch over a class patch, then undone
        unpatch(model)
        assert model(input_ids=ids, labels=labels).logits is None
        unpatch(target)
        assert not is_patched(transformers.LlamaForCausalLM)
        assert transformers.LlamaForCausalLM.forward is original
        torch.testing.assert_close(stock(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)
    finally:
        unpatch(transformers.LlamaForCausalLM)


class _DoubledLoss(transformers.LlamaForCausalLM):
    """A user's subclass of a supported family that overrides forward."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = 2.0 * out.loss + 0.1 * out.loss.detach()
        return out


def test_subclass_overriding_forward_is_not_bypassed(caplog):
    """The subclass's own forward runs, patched as an instance; a class patch of the parent leaves it stock."""
    stock = _DoubledLoss(tiny_config("llama")).train()
    patched = patch(copy.deepcopy(stock))
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with observe() as calls:
        _assert_same(_loss_and_grads(patched, **inputs), _loss_and_grads(stock, **inputs))
    assert calls and calls[0].losses == 1 and patched(**inputs).logits is None
    try:
        patch("llama")
        other = copy.deepcopy(stock)
        with caplog.at_level("WARNING", logger="cce_patch"):
            out = other(**inputs)
        assert out.logits is not None  # not patched, and said so
        assert any("overrides forward" in r.message for r in caplog.records)
        torch.testing.assert_close(out.loss, stock(**inputs).loss)
    finally:
        unpatch("llama")


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_serialized_patched_model_stays_patched(how):
    stock, patched = _pair("llama")
    patch(patched, impl="torch")
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(patched, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    elif how == "pickle":
        loaded = pickle.loads(pickle.dumps(patched))
    else:
        loaded = copy.deepcopy(patched)
    assert is_patched(loaded) and config_of(loaded).impl == "torch"
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    assert loaded(**inputs).logits is None  # is_patched tells the truth
    with observe() as calls:
        _assert_same(_loss_and_grads(loaded, **inputs), _loss_and_grads(stock, **inputs))
    assert calls and calls[0].model is loaded  # the copy's forward drives the copy, not the original
    patch(loaded, impl="auto")
    assert config_of(loaded).impl == "auto" and config_of(patched).impl == "torch"
    unpatch(loaded)
    assert not is_patched(loaded) and loaded(**inputs).logits is not None


def test_patch_through_torch_compile():
    stock, _ = _pair("llama")
    compiled = torch.compile(copy.deepcopy(stock), backend="aot_eager")
    assert patch(compiled, impl="torch") is compiled
    assert is_patched(compiled) and is_patched(compiled._orig_mod)
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss, grads = _loss_and_grads(compiled, **inputs)
    grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
    _assert_same((loss, grads), _loss_and_grads(stock, **inputs))
    assert compiled(**inputs).logits is None
    unpatch(compiled)
    assert not is_patched(compiled._orig_mod)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_patched_forward_traces_as_one_graph_like_stock(family):
    """Under torch.compile (the Trainer's ``torch_compile=True``) the patched forward is one graph, as the stock
    one is: Gemma 2's soft cap scales the deferred logits, and working out the scaled dtype with
    ``torch.result_type`` (a dtype from a torch call) once split its forward into 6 graphs."""
    from cce_patch.bench.e2e.compile import graph_breaks

    stock, patched = _pair(family)
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    assert graph_breaks(stock, inputs)["graph_breaks"] == 0
    report = graph_breaks(patched, inputs)
    assert (report["graphs"], report["graph_breaks"]) == (1, 0), report


class _SoftmaxLoss(transformers.LlamaForCausalLM):
    """A forward whose loss CCE cannot reproduce: it needs the probabilities themselves."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = -logits.softmax(-1)[..., 0].mean() if labels is not None else None
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _AddedLogitBias(transformers.LlamaForCausalLM):
    """A forward that adds a [vocab] tensor to the logits: not a scale, so not foldable."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state) + torch.ones(VOCAB)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)) if labels is not None else None
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize(("cls", "op"), [(_SoftmaxLoss, "softmax"), (_AddedLogitBias, "__add__")])
def test_operations_cce_cannot_reproduce_are_refused(cls, op):
    model = patch(cls(tiny_config("llama")).train())
    ids, mask, labels = batch()
    with pytest.raises(NotImplementedError, match=rf"'llama'.*`{op}`"):
        model(input_ids=ids, labels=labels)
    model.eval()  # stock where CCE does not apply
    assert model(input_ids=ids, labels=labels).loss is not None


def test_families_without_a_usable_head_are_refused():
    with pytest.raises(NotImplementedError, match="prophetnet.*n-gram"):
        patch("prophetnet")
    model = tiny_model("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(NotImplementedError, match="unsupported head module Sequential"):
        patch(model)
    assert not is_patched(model)


def test_unknown_model_type_and_bad_targets():
    with pytest.raises(NotImplementedError, match="no_such_model"):
        patch("no_such_model")
    with pytest.raises(TypeError, match="patch expects"):
        patch(42)
    with pytest.raises(TypeError, match="patch expects"):
        patch(int)


def test_spec_for_names_the_head():
    assert spec_for(tiny_model("llama")).head_attr == "lm_head"
    assert spec_for(tiny_model("gpt2")).head_attr == "lm_head"


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
    from cce_patch.models import patching
    from cce_patch.models.patching import check_transformers_version

    check_transformers_version()
    with pytest.raises(RuntimeError, match="supports transformers"):
        check_transformers_version("4.40.0")
    # the module object patching.py reads (some imports, e.g. Liger's, rebind sys.modules["transformers"])
    monkeypatch.setattr(patching.transformers, "__version__", "6.0.0")
    with pytest.raises(RuntimeError, match="found 6.0.0"):
        patch(tiny_model("llama"))


def test_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="cce_patch"):
        patch(tiny_model("phi3"))
    lines = [r.message for r in caplog.records if r.name == "cce_patch"]
    assert len(lines) == 1 and "phi3" in lines[0] and "impl=auto" in lines[0]


def test_public_api():
    import cce_patch

    assert {"patch", "unpatch", "is_patched", "linear_cross_entropy", "CCEConfig", "__version__"} <= set(cce_patch.__all__)
