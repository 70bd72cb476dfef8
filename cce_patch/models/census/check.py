"""One census entry: a tiny model of one type, patched vs stock on the loss and every parameter gradient.

The model is checked twice: as initialised, and after its weights are perturbed (norm weights and learned
scales away from 1, the head sharpened so that logits are of order one and soft caps and scales matter).
Each time the stock model and a patched copy run the same training step (fp32, same RNG seed, labels with a
masked prompt and padding; ``num_items_in_batch`` as the Trainer passes it where the forward takes it).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from typing import Any

import torch
import transformers

from ..intercept import observe
from ..patching import patch
from ..registry import spec_for
from .tiny import FIRST_ID, LAST_ID, tiny_config

PASS, REFUSED, WRONG, UNBUILDABLE = "PASS", "REFUSED", "WRONG", "UNBUILDABLE"

#: fp32 tolerances: the loss relative to itself; each gradient tensor's max |patched - stock| relative to its own
#: max |stock|, with a floor of GRAD_FLOOR x the largest gradient entry of the model (a gradient that is zero
#: in exact arithmetic, e.g. of a key bias under softmax, is rounding noise in both)
LOSS_RTOL, GRAD_RTOL, GRAD_FLOOR = 1e-5, 1e-4, 1e-3

#: model types beyond transformers' causal-LM mapping that the census also checks (vision-language wrappers
#: people fine-tune), with their class names
EXTRA_TYPES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "llama4": "Llama4ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}


@dataclasses.dataclass
class Result:
    """``key``: the census row (the model type, ``type:Class`` for extra classes); ``status``: PASS / REFUSED /
    WRONG / UNBUILDABLE; ``reason``: why (refusals: the message a user sees); ``notes``: what the patched
    forward folded (soft cap, logit scale, ...) or added (router aux loss); ``error``: the largest relative
    difference seen; ``seconds``: the entry's wall time."""

    key: str
    model_class: str
    status: str
    reason: str = ""
    notes: str = ""
    error: float = 0.0
    seconds: float = 0.0


def model_class_name(key: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if ":" in key:
        return key.split(":", 1)[1]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[key]


def build(key: str, seed: int = 0) -> torch.nn.Module:
    model_type = key.split(":", 1)[0]
    config = tiny_config(model_type)
    if model_type in CONFIG_ATTR:
        config = getattr(config, CONFIG_ATTR[model_type])
    torch.manual_seed(seed)
    if ":" in key:
        model = getattr(transformers, model_class_name(key))(config)
    else:  # as users build it: the auto class picks the causal-LM class for the config (and its text config)
        model = transformers.AutoModelForCausalLM.from_config(config)
    BUILD_HOOKS.get(model_type, lambda m: None)(model)
    return model.float().train()


#: model_type -> what a user must call on a fresh model before training it
BUILD_HOOKS: dict[str, Any] = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}
#: model_type -> the sub-config its causal-LM class is built from
CONFIG_ATTR = {"musicgen": "decoder", "musicgen_melody": "decoder"}


def _codebook_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """One token stream per audio codebook: ids (B * K, T), labels (B, T, K)."""
    k = model.config.num_codebooks
    ids = inputs["input_ids"].repeat_interleave(k, dim=0)
    return {"input_ids": ids, "labels": ids.reshape(-1, k, ids.shape[-1]).transpose(1, 2)}


def _image_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(5)
    return {**inputs, "pixel_values": torch.randn(inputs["input_ids"].shape[0], 3, size, size, generator=g)}


#: model_type -> the inputs its forward needs beyond ids, mask and labels
INPUT_HOOKS: dict[str, Any] = {
    "musicgen": _codebook_inputs,
    "musicgen_melody": _codebook_inputs,
    "git": _image_inputs,  # its loss skips the image tokens, which exist only with an image
}


def make_inputs(model: torch.nn.Module, key: str = "", seed: int = 1, b: int = 2, t: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ID, LAST_ID, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt
    labels[1, -2:] = -100  # padding
    inputs: dict[str, Any] = {"input_ids": ids, "labels": labels}
    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
        inputs["attention_mask"] = mask
    hook = INPUT_HOOKS.get(key.split(":", 1)[0])
    return hook(model, inputs) if hook is not None else inputs


def takes_num_items(model: torch.nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params)


def perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Weights away from their initial values (norms and scales not 1), the head sharpened."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, torch.nn.Linear):
            head.weight.mul_(3.0)


@dataclasses.dataclass
class _Step:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    extras: dict[str, torch.Tensor]
    logits: Any


def train_step(model: torch.nn.Module, inputs: dict[str, Any], seed: int = 3) -> _Step:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    loss = out["loss"] if isinstance(out, dict) else out[0]
    if loss is None:
        raise ValueError("the forward returned no loss")
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    extras = {k: v.detach() for k, v in out.items() if k in ("aux_loss", "z_loss") and torch.is_tensor(v)}
    return _Step(loss.detach(), grads, extras, out.get("logits") if isinstance(out, dict) else None)


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(float(b.abs().max()) if b.numel() else 0.0, floor)
    diff = float((a.float() - b.float()).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare(got: _Step, ref: _Step, patched: bool = True) -> tuple[str | None, float]:
    """(what differs, or None; the largest relative difference). ``patched``: ``got`` must have no logits."""
    worst = _relative(got.loss, ref.loss)
    if not math.isfinite(float(got.loss)) or worst > LOSS_RTOL:
        return f"loss {float(got.loss):.7g} vs stock {float(ref.loss):.7g}", worst
    for key, value in ref.extras.items():
        other = got.extras.get(key)
        if other is None or _relative(other, value) > LOSS_RTOL:
            return f"{key} differs from stock", worst
    if patched and got.logits is not None:
        return "the patched forward returned logits", worst
    floor = GRAD_FLOOR * max((float(g.abs().max()) for g in ref.grads.values() if g is not None and g.numel()),
                             default=0.0)
    for name, g_ref in ref.grads.items():
        g_got = got.grads.get(name)
        if (g_ref is None) != (g_got is None):
            return f"gradient of {name}: {'missing' if g_got is None else 'present where stock has none'}", worst
        if g_ref is not None:
            err = _relative(g_got, g_ref, floor)
            worst = max(worst, err)
            if not math.isfinite(err) or err > GRAD_RTOL:
                return f"gradient of {name} differs from stock (relative {err:.2e})", worst
    return None, worst


def check_entry(key: str, report: Any = None) -> Result:
    """Census entry for ``key`` (a model type, or ``type:Class``). ``report(phase)`` is called as the check
    advances, so that a parent process can tell where a crash happened."""
    started = time.perf_counter()
    cls_name = model_class_name(key)

    def done(status: str, reason: str = "", notes: str = "", error: float = 0.0) -> Result:
        return Result(key, cls_name, status, reason, notes, error, time.perf_counter() - started)

    report = report or (lambda phase: None)
    try:
        spec_for(getattr(transformers, cls_name))  # a registry row refuses the family whatever the model does
    except NotImplementedError as exc:
        return done(REFUSED, _first_line(exc))
    except AttributeError:
        pass
    try:
        model = build(key)
        inputs = make_inputs(model, key)
    except Exception as exc:  # noqa: BLE001 - any failure to build is the census's answer
        return done(UNBUILDABLE, f"build: {type(exc).__name__}: {_first_line(exc)}")
    outcome = _compare(model, inputs, training=True, report=report)
    if isinstance(outcome, str) and outcome.startswith(_IRREPRODUCIBLE):
        # stock training draws fresh randomness (e.g. Reformer's torch.seed()): compare in eval mode instead
        outcome = _compare(model.eval(), inputs, training=False, report=report)
        if isinstance(outcome, tuple):
            outcome = (outcome[0], outcome[1] | {"compared in eval mode"}, outcome[2])
    if isinstance(outcome, Result):
        return dataclasses.replace(outcome, key=key, model_class=cls_name, seconds=time.perf_counter() - started)
    if isinstance(outcome, str):
        return done(UNBUILDABLE, outcome)
    status, notes, worst = outcome
    return done(status, notes=", ".join(sorted(notes)), error=worst)


_IRREPRODUCIBLE = "stock is not reproducible"


def _compare(model: torch.nn.Module, inputs: dict[str, Any], training: bool, report: Any) -> Any:
    """Both phases in one mode: (PASS, notes, worst error), a Result (refused / wrong / unbuildable), or a
    string (stock could not be compared)."""
    worst, notes = 0.0, set()

    def result(status: str, reason: str, error: float = 0.0) -> Result:
        return Result("", "", status, reason, error=error)

    for phase in ("initial weights", "perturbed weights"):
        if phase == "perturbed weights":
            perturb(model)
            if takes_num_items(model):  # as the Trainer passes it: sum / items of all accumulation steps
                inputs = {**inputs, "num_items_in_batch": (inputs["labels"][..., 1:] != -100).sum() * 2}
        report(f"stock, {phase}")
        try:
            ref = train_step(copy.deepcopy(model), inputs)
        except Exception as exc:  # noqa: BLE001
            return f"stock training step: {type(exc).__name__}: {_first_line(exc)}"
        if not math.isfinite(float(ref.loss)):
            return "stock loss is not finite"
        report(f"patched, {phase}")
        try:
            patched = patch(copy.deepcopy(model), impl="torch", train_only=training)
            with observe() as calls:
                got = train_step(patched, inputs)
        except NotImplementedError as exc:
            return result(REFUSED, _first_line(exc))
        except Exception as exc:  # noqa: BLE001
            return result(WRONG, f"patched training step raised {type(exc).__name__}: {_first_line(exc)}")
        if not calls or not any(c.losses for c in calls):
            return result(WRONG, "the patched step did not compute its loss through CCE")
        for call in calls:
            notes |= call.seen
        if ref.extras:
            notes.add("router aux loss")
        problem, err = compare(got, ref)
        worst = max(worst, err)
        if problem is not None:
            again, _ = compare(train_step(copy.deepcopy(model), inputs), ref, patched=False)
            if again is not None:  # stock against itself: the comparison cannot say anything
                return f"{_IRREPRODUCIBLE} under a fixed seed ({again})"
            return result(WRONG, f"{phase}{'' if training else ' (eval mode)'}: {problem}", worst)
    return PASS, notes, worst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
