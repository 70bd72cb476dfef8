"""TRL: its trainers' fused LM head on a patched model runs cce_patch's kernel, and gives TRL's numbers.

Patched vs unpatched runs of the real trainers (SFT, DPO, KTO, GRPO) on a tiny model, same seed, fp32: the
same losses, gradient norms and metrics (``mean_token_accuracy``, ``entropy``, ...), our kernel called and TRL's
``ChunkedLogProbFunction`` not (and the reverse unpatched). The head itself against TRL's on every output
field, with temperature, soft cap, logit scale, pre-shifted labels and ``cast_lm_head_to_fp32``, values and
gradients; a GRPO-style objective from our per-token log-probs against TRL's kernel and an fp64 oracle; the
three ways in (``patch`` before the trainer, ``CCECallback``, ``use_cce=True`` in the config); TRL armed by the patch,
imported before or after it; the bypass warnings; and TRL 0.24 (the logits protocol) refused at trainer init.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from models_tiny import batch, tiny_model  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

import cce_patch  # noqa: E402
import cce_patch.ops.token_stats as token_stats  # noqa: E402
from cce_patch.integrations import trl as cce_trl  # noqa: E402
from cce_patch.integrations import trl_wrappers  # noqa: E402
from cce_patch.integrations.fused_head import (  # noqa: E402
    CCEBypassWarning,
    FusedHeadOptions,
    fused_head_options,
    logit_transform,
)
from cce_patch.integrations.trainer import CCECallback  # noqa: E402
from cce_patch.ops.stats import OUTPUTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
from offline_default import build_tokenizer, generate_dataset  # noqa: E402

pytestmark = pytest.mark.skipif(cce_trl.trl_version() < cce_trl.FUSED_HEAD_SINCE,
                                reason="the installed TRL has no fused LM head")
# TRL's own factory: under our dispatch once a patch in this process has armed the integration, as is before
_FACTORY = trl.trainer.utils.add_fused_lm_head
TRL_HEAD = getattr(_FACTORY, "_cce_trl_original", _FACTORY)


@pytest.fixture
def kernels(monkeypatch):
    """Counts of forward calls of our op and of TRL's kernel."""
    calls = {"ours": 0, "trl": 0}
    ours, theirs = token_stats.TokenStatsFunction.forward, ChunkedLogProbFunction.forward

    def count(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return staticmethod(wrapper)

    monkeypatch.setattr(token_stats.TokenStatsFunction, "forward", count("ours", ours))
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", count("trl", theirs))
    return calls


@pytest.fixture(scope="module")
def data():
    rows = generate_dataset(48, seed=3)
    tokenizer = build_tokenizer(rows, "Instruction Input Response")
    return rows, tokenizer


def _model(tokenizer, patched: bool, family: str = "llama", **patch_options):
    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if patched:
        cce_patch.patch(model, impl="torch", **patch_options)
    return model


def _args(cls, **extra):
    options = dict(output_dir="unused", max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to="none",
                   use_cpu=True, seed=0, save_strategy="no", bf16=False, disable_tqdm=True, learning_rate=1e-3)
    return cls(**{**options, **extra})


def _logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _assert_same_logs(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=2e-5, abs=1e-6), (key, x, y)


def _sft_dataset(rows):
    return Dataset.from_list([{"prompt": f"{r['instruction']} {r['input']}", "completion": " " + r["output"]}
                              for r in rows])


SFT_KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy")


def _train_sft(data, patched: bool, **trainer_kwargs):
    from trl import SFTConfig, SFTTrainer

    rows, tokenizer = data
    model = trainer_kwargs.pop("model", None) or _model(tokenizer, patched)
    args = trainer_kwargs.pop("args", None) or _args(SFTConfig)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(rows), processing_class=tokenizer,
                         **trainer_kwargs)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def sft_reference(data):
    """The unpatched run: TRL's own head."""
    return _logs(_train_sft(data, patched=False))


# ----- SFTTrainer, three ways in ----------------------------------------------------------------------------------
def test_sft_patched_equals_unpatched_and_runs_our_kernel(data, sft_reference, kernels):
    trainer = _train_sft(data, patched=True)
    assert fused_head_options(trainer.model).outputs == ("log_probs", "entropy", "is_top1")
    _assert_same_logs(_logs(trainer), sft_reference, SFT_KEYS)
    assert kernels["ours"] >= 3 and kernels["trl"] == 0


def test_sft_unpatched_keeps_trls_kernel(data, kernels):
    trainer = _train_sft(data, patched=False)
    assert fused_head_options(trainer.model) is None
    assert kernels["trl"] >= 3 and kernels["ours"] == 0


def test_sft_with_the_callback(data, sft_reference, kernels):
    trainer = _train_sft(data, patched=False, callbacks=[CCECallback(cce_patch.CCEConfig(impl="torch"))])
    assert cce_patch.is_patched(trainer.model) and fused_head_options(trainer.model) is not None
    _assert_same_logs(_logs(trainer), sft_reference, SFT_KEYS)
    assert kernels["trl"] == 0 and kernels["ours"] >= 3


def test_sft_with_use_cce_in_the_config(data, sft_reference, kernels):
    config = cce_trl.CCESFTConfig(output_dir="unused", max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                                  report_to="none", use_cpu=True, seed=0, save_strategy="no", bf16=False,
                                  disable_tqdm=True, learning_rate=1e-3, use_cce=True, cce_config={"impl": "torch"})
    trainer = _train_sft(data, patched=False, args=config)
    assert any(isinstance(cb, CCECallback) for cb in trainer.callback_handler.callbacks)
    assert cce_patch.is_patched(trainer.model) and fused_head_options(trainer.model) is not None
    _assert_same_logs(_logs(trainer), sft_reference, SFT_KEYS)
    assert kernels["trl"] == 0


def test_sft_with_lora(data, kernels):
    """PEFT: TRL installs the head on the base model; LoRA on the decoder trains through our kernel, equal to
    TRL's head. A LoRA adapter on lm_head itself is refused at init (by TRL, or by us: its weight is not one
    tensor)."""
    from peft import LoraConfig
    from trl import SFTConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    logs = {}
    for patched in (False, True):
        trainer = _train_sft(data, patched, args=_args(SFTConfig, max_steps=2, learning_rate=1e-2), peft_config=lora)
        logs[patched] = _logs(trainer)
        assert (fused_head_options(trainer.model) is not None) == patched
    _assert_same_logs(logs[True], logs[False], SFT_KEYS)
    assert kernels["ours"] >= 2
    rows, tokenizer = data
    with pytest.raises((ValueError, NotImplementedError), match="lm_head"):
        from trl import SFTTrainer

        SFTTrainer(model=_model(tokenizer, patched=True), args=_args(SFTConfig), processing_class=tokenizer,
                   train_dataset=_sft_dataset(rows[:8]),
                   peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))


def test_cce_configs_keep_trls_defaults_and_parse():
    from transformers import HfArgumentParser
    from trl import SFTConfig

    assert cce_trl.CCESFTConfig.__name__ == "CCESFTConfig" and issubclass(cce_trl.CCESFTConfig, SFTConfig)
    (parsed,) = HfArgumentParser(cce_trl.CCESFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--use_cce", "true", "--cce_config", '{"impl": "torch"}', "--use_cpu", "true"])
    assert parsed.use_cce is True and parsed.cce_config == {"impl": "torch"}
    assert parsed.learning_rate == SFTConfig(output_dir="x", use_cpu=True).learning_rate  # SFT's 2e-5, not 5e-5
    with pytest.raises(ValueError, match="unknown CCE option"):
        cce_trl.CCESFTConfig(output_dir="x", use_cpu=True, cce_config={"nope": 1})
    for name in ("CCEGRPOConfig", "CCEDPOConfig", "CCEKTOConfig", "CCERLOOConfig"):
        assert getattr(cce_trl, name).__name__ == name


# ----- the other trainers that use the head -----------------------------------------------------------------------
def _train_dpo(data, patched: bool):
    from trl import DPOConfig, DPOTrainer

    rows, tokenizer = data
    dataset = Dataset.from_list([{"prompt": r["instruction"], "chosen": " " + r["output"], "rejected": " no"}
                                 for r in rows])
    trainer = DPOTrainer(model=_model(tokenizer, patched), ref_model=_model(tokenizer, patched),
                         args=_args(DPOConfig, max_length=48), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def _train_kto(data, patched: bool):
    from trl import KTOConfig, KTOTrainer

    rows, tokenizer = data
    dataset = Dataset.from_list([{"prompt": r["instruction"], "completion": " " + r["output"], "label": i % 3 != 0}
                                 for i, r in enumerate(rows)])
    trainer = KTOTrainer(model=_model(tokenizer, patched), ref_model=_model(tokenizer, patched),
                         args=_args(KTOConfig, max_length=48), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def _train_grpo(data, patched: bool):
    from trl import GRPOConfig, GRPOTrainer

    rows, tokenizer = data
    dataset = Dataset.from_list([{"prompt": f"{r['instruction']} {r['input']}"} for r in rows])

    def reward(completions, **kwargs):  # any deterministic function of the text
        return [float(len(c) % 7) for c in completions]

    args = _args(GRPOConfig, num_generations=2, max_completion_length=5, temperature=0.7, beta=0.0,
                 per_device_train_batch_size=2, max_steps=2)
    trainer = GRPOTrainer(model=_model(tokenizer, patched), reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("train,keys,roles", [
    (_train_dpo, ("loss", "grad_norm", "entropy", "mean_token_accuracy", "logps/chosen", "logps/rejected",
                  "logits/chosen"), ("model", "ref_model")),
    (_train_kto, ("loss", "grad_norm", "entropy", "logps/chosen", "logits/chosen"), ("model", "ref_model")),
    (_train_grpo, ("loss", "grad_norm", "entropy", "reward"), ("model",)),
], ids=["dpo", "kto", "grpo"])
def test_preference_and_rl_trainers_run_our_kernel(data, kernels, train, keys, roles):
    reference = _logs(train(data, patched=False))
    assert kernels["trl"] > 0 and kernels["ours"] == 0
    kernels["trl"] = 0
    trainer = train(data, patched=True)
    for role in roles:
        assert fused_head_options(getattr(trainer, role)) is not None, role
    _assert_same_logs(_logs(trainer), reference, keys)
    assert kernels["ours"] > 0 and kernels["trl"] == 0


# ----- the head against TRL's, field by field ----------------------------------------------------------------------
@pytest.mark.parametrize("family,temperature,shifted,fp32_head", [
    ("llama", 1.0, False, False),
    ("gemma2", 0.7, False, False),  # final_logit_softcapping with a temperature: the cap folds through it
    ("cohere", 1.3, True, False),  # logit_scale, pre-shifted labels (context parallelism)
    ("granite", 0.5, False, True),  # logits_scaling (a divisor), cast_lm_head_to_fp32
], ids=["llama", "gemma2-softcap", "cohere-scale-shift_labels", "granite-divisor-fp32head"])
def test_head_matches_trls_on_every_field(family, temperature, shifted, fp32_head):
    ids, mask, labels = batch(t=14)
    theirs = tiny_model(family)
    ours = copy.deepcopy(theirs)
    cce_patch.patch(ours, impl="torch")
    TRL_HEAD(theirs, temperature=temperature, cast_lm_head_to_fp32=fp32_head, outputs=OUTPUTS)
    trl.trainer.utils.add_fused_lm_head(ours, temperature=temperature, cast_lm_head_to_fp32=fp32_head, outputs=OUTPUTS)
    assert fused_head_options(ours) is not None and fused_head_options(theirs) is None
    kw = dict(input_ids=ids, attention_mask=mask, fused_lm_head=True, num_items_in_batch=torch.tensor(9))
    kw |= {"shift_labels": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)} if shifted else {
        "labels": labels}
    out_t, out_o = theirs(**kw), ours(**kw)
    assert type(out_o) is type(out_t)
    for name in (*OUTPUTS, "label_mask", "loss"):
        a, b = getattr(out_o, name), getattr(out_t, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)
    # the loss and an entropy bonus: the gradients of both differentiable fields
    objective = lambda out: out.loss - 0.1 * out.entropy.sum()  # noqa: E731
    objective(out_t).backward()
    objective(out_o).backward()
    for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logit_transform_reads_configs_like_trl():
    assert logit_transform(tiny_model("gemma2").config) == (2.0, 1.0)
    assert logit_transform(tiny_model("cohere").config) == (None, 0.5)
    assert logit_transform(tiny_model("granite").config) == (None, 0.25)
    assert logit_transform(tiny_model("llama").config) == (None, 1.0)


def test_unpatched_models_get_trls_own_head():
    model = tiny_model("llama")
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    assert fused_head_options(model) is None
    assert model.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's, under functools.wraps' name
    assert trl_wrappers._trl_head_arguments(model)["outputs"] == ("log_probs", "entropy")


def test_a_trl_head_on_a_patched_model_is_adopted(kernels):
    """A TRL head installed through a reference the dispatch could not reach is replaced at trainer init,
    with its own options."""
    model = tiny_model("llama")
    cce_patch.patch(model, impl="torch")
    TRL_HEAD(model, temperature=0.8, outputs=("log_probs", "mean_logits"))
    assert cce_trl.adopt_trl_head(model)
    assert fused_head_options(model) == FusedHeadOptions(0.8, False, ("log_probs", "mean_logits"))
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.mean_logits is not None and kernels["ours"] == 1 and kernels["trl"] == 0
    out = model(input_ids=ids, attention_mask=mask, labels=labels)  # the patched forward underneath
    assert out.logits is None and out.loss is not None


# ----- GRPO's objective from our per-token log-probs vs TRL's kernel -----------------------------------------------
def _grpo_objective(log_probs, entropy, mask, old, ref, advantages, eps=0.2, beta=0.04, entropy_coef=0.01):
    """GRPO's clipped surrogate with a k3 KL to a reference and an entropy bonus, token-mean over the mask."""
    ratio = torch.exp(log_probs - old)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)
    kl = torch.exp(ref - log_probs) - (ref - log_probs) - 1
    per_token = -(surrogate - beta * kl) - entropy_coef * entropy
    return (per_token * mask).sum() / mask.sum()


def test_grpo_loss_from_our_log_probs_equals_trls_kernel():
    torch.manual_seed(0)
    b, t, d, v, temperature, cap = 4, 9, 40, 211, 0.7, 3.0
    hidden = torch.randn(b, t, d) / d**0.25
    weight = 2.0 * torch.randn(v, d) / d**0.25
    labels = torch.randint(0, v, (b, t))
    labels[:, :3] = -100  # the prompt
    labels[1, -2:] = -100  # padding
    shifted = labels[:, 1:]
    mask = (shifted != -100).double()
    old = torch.randn(b, t - 1).double() * 0.1 - 3
    ref = torch.randn(b, t - 1).double() * 0.1 - 3
    advantages = torch.randn(b, 1).double()

    def ours(h, w):
        out = cce_patch.linear_log_probs(h, w, labels, shift=True, temperature=temperature, softcap=cap,
                                         outputs=("entropy",), impl="torch")
        return out.log_probs[:, :-1], out.entropy[:, :-1]

    def theirs(h, w):
        rows = h[:, :-1].reshape(-1, d)
        lp, ent, *_ = ChunkedLogProbFunction.apply(rows, w, None, shifted.clamp(min=0).reshape(-1), temperature,
                                                   64, cap, 1.0, ("entropy",))
        keep = shifted != -100
        return lp.view(b, t - 1).masked_fill(~keep, 0), ent.view(b, t - 1).masked_fill(~keep, 0)

    def oracle(h, w):
        z = cap * torch.tanh((h @ w.T) / cap) / temperature
        log_p = torch.log_softmax(z[:, :-1], -1)
        lp = log_p.gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        keep = shifted != -100
        return lp.masked_fill(~keep, 0), ent.masked_fill(~keep, 0)

    results = {}
    for name, fn, dtype in (("ours", ours, torch.float32), ("trl", theirs, torch.float32),
                            ("fp64", oracle, torch.float64)):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        lp, ent = fn(h, w)
        loss = _grpo_objective(lp.double(), ent.double(), mask, old, ref, advantages)
        results[name] = (loss, *torch.autograd.grad(loss, (h, w)))
    for name in ("ours", "trl"):
        for got, want in zip(results[name], results["fp64"], strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for got, want in zip(results["ours"], results["trl"], strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)


# ----- refusals and warnings ----------------------------------------------------------------------------------------
def test_bypassing_paths_are_named(data):
    from trl import SFTConfig, SFTTrainer

    rows, tokenizer = data
    model = _model(tokenizer, patched=True)
    with pytest.warns(CCEBypassWarning, match="compute_loss_func"):
        SFTTrainer(model=model, args=_args(SFTConfig), train_dataset=_sft_dataset(rows[:8]),
                   processing_class=tokenizer, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)
    with pytest.warns(CCEBypassWarning, match="label_smoothing_factor"):
        SFTTrainer(model=_model(tokenizer, patched=True), args=_args(SFTConfig, label_smoothing_factor=0.1),
                   train_dataset=_sft_dataset(rows[:8]), processing_class=tokenizer)


def test_logits_in_a_training_forward_warn_once():
    model = tiny_model("llama")
    cce_patch.patch(model, impl="torch")
    trl.trainer.utils.add_fused_lm_head(model)
    model.train()
    ids, mask, labels = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CCEBypassWarning)
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()
        model(input_ids=ids, attention_mask=mask, labels=labels)  # the patched forward: no logits either
        with torch.no_grad():
            model(input_ids=ids)  # generation-like: no autograd, no warning
    with pytest.warns(CCEBypassWarning, match="materialised its"):
        model(input_ids=ids, attention_mask=mask).logits.sum()  # a loss computed from logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", CCEBypassWarning)
        model(input_ids=ids, attention_mask=mask)  # once per model


def test_label_smoothing_of_a_patched_model_is_refused_by_the_head():
    model = tiny_model("llama")
    cce_patch.patch(model, impl="torch", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        trl.trainer.utils.add_fused_lm_head(model)


def test_filter_eps_of_a_patched_model_is_said_not_to_reach_the_head(caplog):
    """TRL's fused head computes per-token log-probs exactly; a patched model's filter_eps is for the CCE loss,
    and installing the head says so rather than ignoring it silently."""
    model = tiny_model("llama")
    cce_patch.patch(model, impl="torch", filter_eps=2.0**-12)
    with caplog.at_level("WARNING", logger="cce_patch"):
        trl.trainer.utils.add_fused_lm_head(model)
    assert any("filter_eps applies to the CCE loss only" in r.getMessage() for r in caplog.records)


def test_unknown_head_arguments_are_refused():
    model = tiny_model("llama")
    cce_patch.patch(model, impl="torch")
    with pytest.raises(TypeError, match="does not implement"):
        trl.trainer.utils.add_fused_lm_head(model, chunk_size=4096)
    with pytest.raises(ValueError, match="unknown fused LM head output"):
        trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "perplexity"))


# ----- arming, in a fresh interpreter ---------------------------------------------------------------------------------
def _python(code: str, extra_path: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (extra_path, str(ROOT), str(ROOT / "tests"),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_armed_in_this_process_once_a_model_is_patched():
    """This module imported TRL's trainer modules before any patch; patching arms them at once."""
    import trl.trainer.dpo_trainer as dpo
    import trl.trainer.sft_trainer as sft
    import trl.trainer.utils as utils

    from cce_patch.integrations.trl_hook import _AfterImport

    cce_patch.patch(tiny_model("llama"), impl="torch")
    assert any(isinstance(f, _AfterImport) for f in sys.meta_path)
    assert utils.add_fused_lm_head is sft.add_fused_lm_head is dpo.add_fused_lm_head
    assert utils.add_fused_lm_head._cce_trl_original is TRL_HEAD
    assert sft.SFTTrainer.__init__._cce_checked and dpo.DPOTrainer.__init__._cce_checked


#: Run in a fresh interpreter after ``model`` was patched and ``sft`` / ``dpo`` / ``utils`` imported (in either
#: order): the factory SFTTrainer's __init__ calls installs our head on the patched model (our kernel runs, TRL's
#: does not) and TRL's own on an unpatched one; the trainers' __init__ are checked.
ROUTES_TO_OUR_KERNEL = """
    import cce_patch.ops.token_stats as token_stats
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from cce_patch.integrations.fused_head import fused_head_options
    calls = {"ours": 0, "trl": 0}
    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return staticmethod(wrapper)
    token_stats.TokenStatsFunction.forward = counted("ours", token_stats.TokenStatsFunction.forward)
    ChunkedLogProbFunction.forward = counted("trl", ChunkedLogProbFunction.forward)
    assert utils.add_fused_lm_head is sft.add_fused_lm_head is dpo.add_fused_lm_head is not original
    assert utils.add_fused_lm_head._cce_trl_original is original
    assert sft.SFTTrainer.__init__._cce_checked and dpo.DPOTrainer.__init__._cce_checked
    ids, mask, labels = batch()
    sft.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert fused_head_options(model) is not None and out.entropy is not None and calls == {"ours": 1, "trl": 0}, calls
    stock = tiny_model("llama")
    sft.add_fused_lm_head(stock, outputs=("log_probs", "entropy"))
    stock(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert fused_head_options(stock) is None and calls == {"ours": 1, "trl": 1}, calls
    print("routed")
"""


def test_trl_imported_before_the_patch_is_armed_by_the_patch():
    run = _python(textwrap.dedent("""
        import sys
        import trl.trainer.sft_trainer as sft, trl.trainer.dpo_trainer as dpo, trl.trainer.utils as utils
        original = utils.add_fused_lm_head
        import cce_patch
        from models_tiny import batch, tiny_model
        assert utils.add_fused_lm_head is original, "import cce_patch alone must not touch TRL"
        assert not hasattr(sft.SFTTrainer.__init__, "_cce_checked")
        model = cce_patch.patch(tiny_model("llama"), impl="torch")
    """) + textwrap.dedent(ROUTES_TO_OUR_KERNEL))
    assert run.returncode == 0 and "routed" in run.stdout, run.stderr[-3000:]


def test_trl_imported_after_the_patch_is_armed_as_it_loads():
    run = _python(textwrap.dedent("""
        import sys
        import cce_patch
        from models_tiny import batch, tiny_model
        model = cce_patch.patch(tiny_model("llama"), impl="torch")
        assert "trl" not in sys.modules, "patching must not import TRL"
        import trl.trainer.utils as utils
        original = utils.add_fused_lm_head._cce_trl_original  # wrapped as it loaded
        import trl.trainer.sft_trainer as sft, trl.trainer.dpo_trainer as dpo
    """) + textwrap.dedent(ROUTES_TO_OUR_KERNEL))
    assert run.returncode == 0 and "routed" in run.stdout, run.stderr[-3000:]


def test_a_trl_config_with_use_cce_arms_without_a_prior_patch():
    """``CCESFTConfig(use_cce=True)`` is the only request for CCE in such a program: the trainer must be checked
    (and add the callback) though nothing was patched before it was built."""
    run = _python("""
        import trl.trainer.sft_trainer as sft
        from cce_patch.integrations.trl import CCESFTConfig
        assert sft.SFTTrainer.__init__._cce_checked
        print("armed")
    """)
    assert run.returncode == 0 and "armed" in run.stdout, run.stderr[-3000:]


@pytest.fixture(scope="session")
def trl_024(tmp_path_factory) -> str:
    """TRL 0.24 (the logits protocol) installed beside the test run, from PyPI (skips offline)."""
    target = os.environ.get("CCE_TRL_OLD_DIR") or str(tmp_path_factory.mktemp("trl024"))
    if not (Path(target) / "trl" / "__init__.py").is_file():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                              "trl==0.24.0"], capture_output=True, text=True, timeout=300)
        if pip.returncode != 0:
            pytest.skip(f"could not fetch trl 0.24 from PyPI: {pip.stderr.strip()[-300:]}")
    return target


def test_trl_024_sft_refused_at_init_or_trains_with_logits(trl_024):
    run = _python("""
        import sys, warnings
        import torch, trl, cce_patch
        assert trl.__version__ == "0.24.0", trl.__version__
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        sys.path.insert(0, "recipes")
        from offline_default import build_tokenizer, generate_dataset
        from models_tiny import tiny_model
        rows = generate_dataset(16)
        tok = build_tokenizer(rows, "x")
        data = Dataset.from_list([{"prompt": r["instruction"], "completion": " " + r["output"]} for r in rows])
        args = SFTConfig(output_dir="unused", max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, save_strategy="no", bf16=False, disable_tqdm=True, logging_steps=1)
        model = tiny_model("llama", vocab_size=len(tok))
        cce_patch.patch(model, impl="torch")
        try:
            SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        except RuntimeError as exc:
            assert "outputs.logits" in str(exc) and "trl>=1.15" in str(exc), exc
            print("refused")
        cce_patch.patch(model, return_logits=True)  # the logits are built: TRL 0.24's metrics work
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        log = [h for h in trainer.state.log_history if "loss" in h][0]
        assert "mean_token_accuracy" in log and "entropy" in log, log
        print("trained")
    """, extra_path=trl_024)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "refused" in run.stdout and "trained" in run.stdout, run.stdout


# ----- the recipe -----------------------------------------------------------------------------------------------------
def test_recipe_trains_briefly_offline(tmp_path, kernels):
    import finetune_trl_sft

    threads = torch.get_num_threads()
    trainer = finetune_trl_sft.main([
        "--max_steps", "4", "--offline_examples", "64", "--logging_steps", "2", "--output_dir", str(tmp_path),
        "--disable_tqdm", "true", "--report_to", "none", "--cce_config", '{"impl": "torch"}', "--sample_answers", "2",
    ])
    assert torch.get_num_threads() == threads  # the tiny model's single thread is given back
    assert cce_patch.is_patched(trainer.model) and fused_head_options(trainer.model) is not None
    assert kernels["ours"] >= 4 and kernels["trl"] == 0
    logs = _logs(trainer)
    assert len(logs) == 2 and all({"loss", "mean_token_accuracy", "entropy"} <= set(h) for h in logs)
    assert trainer.args.bf16 is False and (tmp_path / "trainer_state.json").is_file()


def test_recipe_config_parses_like_the_trainer_recipe():
    import finetune_trl_sft

    script, train = finetune_trl_sft.parse_args(["--output_dir", "x"])
    assert train.use_cce is True and train.max_steps > 0 and script.dataset_name == "generated"
    _, stock = finetune_trl_sft.parse_args(["--use_cce", "false", "--output_dir", "x"])
    assert stock.use_cce is False
