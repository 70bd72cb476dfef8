"""Tiny models of each family, built from configs (no downloads), for patched-vs-stock comparisons."""

from __future__ import annotations

import torch
import transformers

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)

#: family -> (config class, extra config fields). Registry families first, then standard families with no row.
FAMILY_CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "mistral": (transformers.MistralConfig, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, {"final_logit_softcapping": 2.0, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma3_text": (transformers.Gemma3TextConfig, {"final_logit_softcapping": 2.0, "head_dim": 8,
                                                    "query_pre_attn_scalar": 8}),
    "cohere": (transformers.CohereConfig, {"logit_scale": 0.5}),
    "cohere2": (transformers.Cohere2Config, {"logit_scale": 0.5, "sliding_window": 8, "eos_token_id": 2}),
    "granite": (transformers.GraniteConfig, {"logits_scaling": 4.0}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}),
    "olmo2": (transformers.Olmo2Config, {}),
    "gpt2": (transformers.GPT2Config, {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                                       "bos_token_id": 1, "eos_token_id": 2,
                                       "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
}
#: every family above: soft caps (gemma2/3), logit scales (cohere, granite), gpt2's decoder at `.transformer`
FAMILIES = list(FAMILY_CONFIGS)


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, extra = FAMILY_CONFIGS[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def batch(seed: int = 1, b: int = 2, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask, labels
