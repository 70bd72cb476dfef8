"""Detecting another library's fused loss on a model (models/foreign_losses.py), on CPU.

Liger-Kernel's patch functions only rebind forwards and module attributes, so they run here; of its Triton
kernels, its fused linear cross-entropy and RoPE run under the interpreter (its RMSNorm and SwiGLU do not: the
composed model's numerics are tests/gpu/test_liger_compose.py).
Every process-wide attribute Liger changes is restored by monkeypatch after each test.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from conftest import INTERPRETING
from models_tiny import tiny_model

from cce_patch import patch, unpatch
from cce_patch.models.foreign_losses import detect_foreign_loss, foreign_loss_forward


@pytest.fixture
def liger():
    """Imported when a test runs, not at collection (as is modeling_llama below): importing Liger or a modeling
    module replaces ``sys.modules["transformers"]`` with a new module object, and test modules collected after
    this one would then hold a different ``transformers`` than cce_patch does."""
    return pytest.importorskip("liger_kernel.transformers")


@pytest.fixture
def restore_llama(monkeypatch):
    """Snapshot what apply_liger_kernel_to_llama may replace process-wide, so monkeypatch puts it back."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)


def _no_kernels(**flags):
    return {**dict(rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False),
            **flags}


def test_stock_and_patched_models_have_no_foreign_loss(restore_llama, liger):
    model = tiny_model("llama")
    assert detect_foreign_loss(model) is None and detect_foreign_loss(type(model)) is None
    patch(model)
    assert detect_foreign_loss(model) is None
    # Liger's other kernels (what composes with ours) are not a loss.
    liger.apply_liger_kernel_to_llama(fused_linear_cross_entropy=False, model=model)
    assert type(model.model.norm.forward.__func__).__name__ == "function"
    assert model.model.norm.forward.__func__.__module__.startswith("liger_kernel")
    assert detect_foreign_loss(model) is None


def test_liger_loss_on_the_instance_before_and_after_patch(restore_llama, liger, caplog):
    model = tiny_model("llama")
    liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True), model=model)
    found = foreign_loss_forward(model)
    assert found.library == "liger_kernel" and found.where == "the instance" and found.runs
    assert found.function.startswith("liger_kernel.transformers.model.llama.")
    assert "Liger-Kernel's fused linear cross-entropy" in detect_foreign_loss(model)
    assert "computes this model's loss" in detect_foreign_loss(model)
    assert detect_foreign_loss(type(model)) is None  # the class is untouched
    with caplog.at_level("WARNING", logger="cce_patch"):
        patch(model)  # ours goes over it (what then runs: test_which_loss_runs_under_cce_patch below)
    found = foreign_loss_forward(model)
    assert found.library == "liger_kernel" and not found.runs
    assert "neither loss trains" in detect_foreign_loss(model)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cce_patch.patch(LlamaForCausalLM)" in m and "neither loss trains" in m for m in said), said
    # Liger applied after patch rebinds the instance's forward: then Liger's loss runs, not ours.
    liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True), model=model)
    assert foreign_loss_forward(model).runs
    unpatch(model)


def test_liger_loss_on_the_class(restore_llama, liger, caplog):
    liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True))
    cls = type(tiny_model("llama"))
    found = foreign_loss_forward(cls)
    assert found.where == "class LlamaForCausalLM" and found.runs
    model = tiny_model("llama")
    assert foreign_loss_forward(model).runs and "class LlamaForCausalLM" in detect_foreign_loss(model)
    patch(model)
    assert not foreign_loss_forward(model).runs
    unpatch(model)
    with caplog.at_level("WARNING", logger="cce_patch"):
        patch(cls)
    try:
        assert not foreign_loss_forward(cls).runs and not foreign_loss_forward(tiny_model("llama")).runs
        assert any("cce_patch.patch(LlamaForCausalLM)" in r.getMessage() for r in caplog.records)
    finally:
        unpatch(cls)


def test_wrapped_forwards_and_other_libraries(restore_llama):
    """Recognised through bound methods, partials and __wrapped__ chains (accelerate wraps forwards)."""
    model = tiny_model("llama")

    def apple_forward(self, *args, **kwargs):
        raise AssertionError("never called")

    apple_forward.__module__ = "cut_cross_entropy.transformers.llama"

    @functools.wraps(apple_forward)
    def wrapper(*args, **kwargs):
        return apple_forward(*args, **kwargs)

    wrapper.__module__ = "accelerate.utils.operations"
    model.forward = types.MethodType(functools.partial(wrapper), model)
    found = foreign_loss_forward(model)
    assert found.library == "cut_cross_entropy" and "apple's Cut Cross-Entropy" in str(found)
    del model.forward

    def user_forward(self, *args, **kwargs):  # a user's own forward is not a foreign loss
        raise AssertionError("never called")

    model.forward = types.MethodType(user_forward, model)
    assert detect_foreign_loss(model) is None


def test_liger_cross_entropy_replacing_torch_is_named(restore_llama, liger):
    """Liger's cross_entropy=True replaces F.cross_entropy process-wide; a patched model's training call then
    hands its deferred logits to Liger's function and is refused, as the message says."""
    from models_tiny import batch

    liger.apply_liger_kernel_to_llama(**_no_kernels(cross_entropy=True))
    model = tiny_model("llama")
    message = detect_foreign_loss(model)
    assert message is not None and "torch.nn.functional.cross_entropy" in message and "liger_kernel" in message
    assert "refuses its training calls" in message
    patch(model)
    ids, mask, labels = batch()
    with pytest.raises(NotImplementedError, match="cannot train"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    unpatch(model)


def test_peft_model_is_looked_through(restore_llama, liger):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True), model=model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert foreign_loss_forward(wrapped).library == "liger_kernel"


@pytest.fixture
def liger_loss_calls(liger, monkeypatch):
    """Counts the calls of Liger's causal-LM loss as Liger's llama forward reaches it (the real one runs)."""
    from liger_kernel.transformers.model import llama as liger_llama

    calls: list[int] = []
    loss = liger_llama.LigerForCausalLMLoss

    def counted(*args, **kwargs):
        calls.append(1)
        return loss(*args, **kwargs)

    monkeypatch.setattr(liger_llama, "LigerForCausalLMLoss", counted)
    return calls


@pytest.mark.skipif(not INTERPRETING, reason="Liger's loss on CPU tensors needs TRITON_INTERPRET=1 (GPU: tests/gpu/)")
@pytest.mark.parametrize("where", ["instance", "class"])
def test_which_loss_runs_under_cce_patch(restore_llama, liger, liger_loss_calls, where):
    """patch() over Liger's fused-loss forward: in training Liger's forward and loss run (observed), our op
    never does (observed), and cce_patch refuses the call, as the message says; in evaluation Liger's forward
    gives stock's loss. Liger applied after patch: its loss runs and ours is gone."""
    from models_tiny import batch

    from cce_patch.models.intercept import observe

    stock = tiny_model("llama").train()
    ids, mask, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    expected = stock(**inputs).loss
    model = tiny_model("llama").train()
    liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True),
                                      **({"model": model} if where == "instance" else {}))
    patch(model)
    assert "neither loss trains" in detect_foreign_loss(model)
    refusal = "Liger-Kernel's fused linear cross-entropy .* computed its own loss"
    with observe() as calls, pytest.raises(NotImplementedError, match=refusal):
        model(**inputs)
    assert len(liger_loss_calls) == 1 and [c.losses for c in calls] == [0]  # Liger's loss ran, ours did not
    model.eval()
    with observe() as calls:
        loss = model(**inputs).loss  # CCE does not apply in eval: Liger's forward, its logits path
    assert calls == [] and len(liger_loss_calls) == 1
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    unpatch(model)
    if where == "instance":  # Liger over ours: its forward replaces ours and its loss trains
        model.train()
        patch(model)
        liger.apply_liger_kernel_to_llama(**_no_kernels(fused_linear_cross_entropy=True), model=model)
        assert "computes this model's loss" in detect_foreign_loss(model)
        with observe() as calls:
            loss = model(**inputs).loss
        assert calls == [] and len(liger_loss_calls) == 2
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        unpatch(model)
