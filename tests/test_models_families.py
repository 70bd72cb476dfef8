"""Families beyond the plain decoder: MoE router aux losses, unshifted labels, learned per-vocab scales, z-losses,
and vision-language models with real image inputs, patched vs stock (the census covers every type; these run
in-process, with images, and name the family in the failure)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from cce_patch import patch
from cce_patch.models.census.check import PASS, check_entry, compare, train_step
from cce_patch.models.census.tiny import FIRST_ID, LAST_ID, tiny_config
from cce_patch.models.intercept import observe

CONFIGS = transformers.models.auto.configuration_auto.CONFIG_MAPPING
#: the tiny builder and these model classes follow transformers 5's configs (the census runs on any version)
needs_v5 = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 5 configs")


def _needs(model_type: str) -> None:
    if model_type not in CONFIGS:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")


@pytest.mark.parametrize(
    ("key", "folded"),
    [
        ("mixtral", "router aux loss"),  # load-balancing loss added to the LM loss as stock adds it
        ("granitemoe", "logit scale, router aux loss"),
        ("bart", ""),  # its decoder scores unshifted labels with CrossEntropyLoss
        ("dory", "per-vocab scale"),  # an nn.Linear subclass multiplying by a learned per-token-id scale
        ("bamba", "logsumexp"),  # z-loss: logsumexp of the logits
        ("gemma3_text", "soft cap"),
        ("falcon_h1", "logit scale"),
        ("mamba", ""),
    ],
)
def test_family_exact(key, folded):
    _needs(key)
    result = check_entry(key)
    assert (result.status, result.reason) == (PASS, "") and result.notes == folded


def test_dory_logit_scale_trains():
    """The issue-15 case: the head's own parameter gets its gradient through CCE."""
    _needs("dory")
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("dory")).train()
    patched = patch(copy.deepcopy(model), impl="torch")
    ids = torch.randint(FIRST_ID, LAST_ID, (2, 8), generator=torch.Generator().manual_seed(0))
    ref, got = train_step(model, {"input_ids": ids, "labels": ids}), train_step(patched, {"input_ids": ids, "labels": ids})
    assert compare(got, ref)[0] is None
    grad = got.grads["lm_head.logit_scale"]
    assert grad is not None and grad.abs().sum() > 0


def _llava_inputs(config):
    n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = torch.randint(FIRST_ID, LAST_ID, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 1:1 + n] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    size = config.vision_config.image_size
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, size, size)}


def _qwen_vl_inputs(config):
    vision, side = config.vision_config, 2  # a 2 x 2 grid of patches per image
    n = side * side // vision.spatial_merge_size**2
    ids = torch.randint(FIRST_ID, LAST_ID, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2:2 + n] = config.image_token_id
    labels = ids.clone()
    labels[:, :2 + n] = -100
    return {
        "input_ids": ids, "labels": labels,
        "pixel_values": torch.randn(2 * side * side, 3 * vision.temporal_patch_size * vision.patch_size**2),
        "image_grid_thw": torch.tensor([[1, side, side]] * 2),
        "mm_token_type_ids": (ids == config.image_token_id).long(),
    }


@needs_v5
@pytest.mark.parametrize(
    ("model_type", "cls", "inputs"),
    [
        ("llava", "LlavaForConditionalGeneration", _llava_inputs),
        ("qwen2_vl", "Qwen2VLForConditionalGeneration", _qwen_vl_inputs),
        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _qwen_vl_inputs),
        ("qwen3_vl", "Qwen3VLForConditionalGeneration", _qwen_vl_inputs),
    ],
)
def test_vision_language_model_with_images(model_type, cls, inputs):
    """The images go through the vision tower untouched; the language-model loss comes through CCE."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).train()
    batch = inputs(config)
    ref = train_step(copy.deepcopy(model), batch)
    with observe() as calls:
        got = train_step(patch(copy.deepcopy(model), impl="torch"), batch)
    assert [c.losses for c in calls] == [1]
    problem, _ = compare(got, ref)
    assert problem is None
    vision = [n for n, g in got.grads.items() if g is not None and ("vision" in n or "visual" in n)]
    assert vision  # the vision tower trained, through the image features the stock forward merged in
