"""``use_cce=True`` with transformers' ``use_liger_kernel=True``: Liger's decoder kernels, our loss, in one flag.

On CPU the composed Trainer really trains with Liger's RoPE kernel, the one of its kernels that runs under
Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA; its RMSNorm and SwiGLU kernels fail there
inside Triton, so these tests switch them off through ``liger_kernel_config``, which also shows a user's own
options surviving). What is checked: the config the Trainer hands to Liger, the kernel Liger installed, which
loss ran (our op's calls counted by ``observe()``, Liger's loss function spied on) and the
losses and weights against a stock run. The bf16 / CUDA numerics are tests/gpu/test_liger_compose.py.
Liger replaces process-wide attributes; monkeypatch restores them after each test.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import INTERPRETING
from models_tiny import VOCAB, tiny_model
from transformers import Trainer, TrainingArguments

from cce_patch.integrations.trainer import CCECallback, CCETrainer, CCETrainingArguments, liger_config_without_loss
from cce_patch.models.intercept import observe

#: Liger's Triton kernels on CPU tensors run only under the interpreter (on a CUDA machine: tests/gpu/)
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="Liger's kernels on CPU need TRITON_INTERPRET=1")
LOSS_OFF = {"fused_linear_cross_entropy": False, "cross_entropy": False}
#: Liger's kernels that do not run under Triton's CPU interpreter, off in the CPU runs
CPU_KERNELS_ONLY = {"rms_norm": False, "swiglu": False}


@pytest.fixture
def liger(monkeypatch):
    """Liger imported when a test runs (see tests/test_foreign_losses.py for why not at collection), with what
    ``apply_liger_kernel_to_llama`` may replace process-wide snapshotted for monkeypatch to restore."""
    module = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)
    return module


@pytest.fixture
def liger_calls(liger, monkeypatch):
    """The kwargs of every ``_apply_liger_kernel_to_instance`` call the Trainer makes, and the number of calls of
    Liger's causal-LM loss (the real functions run; they are only counted)."""
    from liger_kernel.transformers.model import llama as liger_llama

    seen: dict[str, list] = {"apply": [], "loss": []}
    apply, loss = liger._apply_liger_kernel_to_instance, liger_llama.LigerForCausalLMLoss

    def counted_apply(model, **kwargs):
        seen["apply"].append(kwargs)
        return apply(model=model, **kwargs)

    def counted_loss(*args, **kwargs):
        seen["loss"].append(1)
        return loss(*args, **kwargs)

    monkeypatch.setattr(liger, "_apply_liger_kernel_to_instance", counted_apply)
    monkeypatch.setattr(liger_llama, "LigerForCausalLMLoss", counted_loss)
    return seen


def _data(n=8, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (t,), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _args(tmp_path, cls=CCETrainingArguments, **extra):
    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0, data_seed=0)
    return cls(**{**base, **extra})


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_arguments_turn_liger_loss_off_only_with_both_flags(caplog):
    with caplog.at_level(logging.INFO, logger="cce_patch"):
        args = CCETrainingArguments(output_dir="x", report_to="none", use_cce=True, use_liger_kernel=True,
                                    liger_kernel_config={"rms_norm": False, "fused_linear_cross_entropy": True})
    assert args.liger_kernel_config == {"rms_norm": False, **LOSS_OFF}  # use_cce wins over a user's loss option
    assert "Liger-Kernel's decoder kernels" in caplog.text and "fused_linear_cross_entropy=False" in caplog.text
    assert CCETrainingArguments(output_dir="x", report_to="none", use_cce=False, use_liger_kernel=True,
                                liger_kernel_config={"rms_norm": False}).liger_kernel_config == {"rms_norm": False}
    assert CCETrainingArguments(output_dir="x", report_to="none", use_cce=True).liger_kernel_config is None
    assert liger_config_without_loss(json.dumps({"swiglu": False})) == {"swiglu": False, **LOSS_OFF}


@needs_interpreter
@pytest.mark.parametrize("how", ["cce_trainer", "plain_trainer_callback"])
def test_use_cce_with_use_liger_kernel_trains_liger_kernels_with_our_loss(tmp_path, liger_calls, how):
    stock_model = tiny_model("llama")
    stock = Trainer(model=stock_model, args=_args(tmp_path / "stock", TrainingArguments), train_dataset=_data())
    stock.train()

    from transformers.models.llama import modeling_llama

    model = tiny_model("llama")
    flags = dict(use_liger_kernel=True, liger_kernel_config=dict(CPU_KERNELS_ONLY))
    if how == "cce_trainer":
        trainer = CCETrainer(model=model, args=_args(tmp_path / "both", use_cce=True, **flags), train_dataset=_data())
    else:  # plain TrainingArguments: the callback sets the config before train() applies Liger
        trainer = Trainer(model=model, args=_args(tmp_path / "both", TrainingArguments, **flags),
                          train_dataset=_data(), callbacks=[CCECallback()])
    rope = modeling_llama.apply_rotary_pos_emb
    with observe() as calls:
        trainer.train()

    assert liger_calls["apply"] == [{**CPU_KERNELS_ONLY, **LOSS_OFF}]  # what the Trainer gave Liger
    assert modeling_llama.apply_rotary_pos_emb is not rope  # Liger's RoPE is installed (and ran: see the losses)
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert liger_calls["loss"] == []  # Liger's loss never ran
    assert len(calls) == 2 and all(c.losses == 1 for c in calls)  # ours did, once per step
    torch.testing.assert_close(torch.tensor(_losses(trainer)), torch.tensor(_losses(stock)), rtol=1e-5, atol=1e-5)
    # Liger's RoPE rounds differently from stock in fp32 (~1e-7); AdamW turns that into ~2e-5 on a few weights
    # whose gradient is near zero. A wrong loss would move them by ~lr = 1e-2.
    for (name, a), (_, b) in zip(model.named_parameters(), stock_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@needs_interpreter
def test_use_liger_kernel_alone_keeps_liger_loss(tmp_path, liger_calls):
    """Without use_cce the Trainer's Liger config is left alone: Liger's fused loss runs (the control arm)."""
    model = tiny_model("llama")
    trainer = CCETrainer(model=model, args=_args(tmp_path, use_cce=False, use_liger_kernel=True, max_steps=1,
                                                 liger_kernel_config=dict(CPU_KERNELS_ONLY)), train_dataset=_data())
    with observe() as calls:
        trainer.train()
    assert liger_calls["apply"] == [CPU_KERNELS_ONLY] and len(liger_calls["loss"]) == 1 and calls == []


def test_liger_fused_loss_already_on_the_model_is_refused_at_init(tmp_path, liger):
    """A model given to the Trainer with Liger's fused loss installed cannot train with CCE (foreign_losses.py
    says why): refused when the Trainer is built, with the fix, not at the first step."""
    model = tiny_model("llama")
    liger.apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, model=model)
    with pytest.raises(RuntimeError, match="fused_linear_cross_entropy=False"):
        CCETrainer(model=model, args=_args(tmp_path, use_cce=True), train_dataset=_data())


def test_liger_cross_entropy_in_place_of_torch_is_refused_at_init(tmp_path, liger):
    """Liger's cross_entropy=True (process-wide) would make every patched training step fail: refused up front."""
    liger.apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False,
                                      cross_entropy=True)
    with pytest.raises(RuntimeError, match="torch.nn.functional.cross_entropy"):
        CCETrainer(model=tiny_model("llama"), args=_args(tmp_path, use_cce=True), train_dataset=_data())
