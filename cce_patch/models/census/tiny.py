"""Tiny configs for every causal-LM type, built from each config class's own defaults (no downloads).

Sizes are shrunk by name (hidden 64, 2 layers, 4 heads, vocab 256, 4 experts, ...) wherever a config has the
field, recursively through sub-configs (a VLM's text and vision configs), so the model's own ``__post_init__``
derives the rest consistently. Mixture-of-experts configs get their router auxiliary loss switched on
(``output_router_logits=True`` and a coefficient large enough to matter). Special token ids beyond the tiny
vocabulary are moved to its top, above the ids the census feeds in. ``OVERRIDES`` holds the few per-type
fields that the generic shrinking cannot guess; it is test data, not a quirk of the patching mechanism.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

VOCAB = 256
#: input ids are drawn from [FIRST_ID, LAST_ID); special tokens live above
FIRST_ID, LAST_ID = 4, 192
HIDDEN = 64

#: field -> tiny value, applied wherever a config (or sub-config) has the field
SIZES: dict[str, Any] = {
    # widths
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN, "dim": HIDDEN, "emb_dim": HIDDEN,
    "embedding_size": HIDDEN, "embedding_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "out_hidden_size": HIDDEN,
    "intermediate_size": 128, "ffn_dim": 128, "d_ff": 128, "n_inner": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "ffn_hidden_size": 128, "dim_ff": 128, "feed_forward_size": 128, "d_inner": 128,
    "dense_intermediate_size": 128, "intermediate_size_mlp": 128, "dff": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32, "shared_experts_intermediate_size": 32,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 1,
    "num_decoder_layers": 2, "num_encoder_layers": 1, "depth": 1,
    # attention
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4, "num_decoder_attention_heads": 4,
    "num_encoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "head_dim": 16,
    "kv_channels": 16, "attention_head_dim": 16, "d_head": 16, "dim_head": 16, "attention_head_size": 16,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_target_positions": 128,
    "max_source_positions": 128, "sliding_window": 4, "sliding_window_size": 4, "attention_window_size": 4,
    "attention_chunk_size": 4,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1,
    "decoder_sparse_step": 1, "output_router_logits": True, "router_aux_loss_coef": 0.3, "aux_loss_coef": 0.3,
    # state-space / recurrent / linear attention
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "expand": 2,
    "conv_kernel": 4, "time_step_rank": 8, "mamba_dt_rank": 8, "mamba_n_heads": 8, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_headdim": 16, "mamba_num_heads": 8, "mamba_n_groups": 1, "mamba_ngroups": 1,
    "n_groups": 1, "mamba_chunk_size": 8, "chunk_size": 8, "mamba_d_ssm": 128,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "linear_head_dim": 16,
    "linear_num_heads": 4, "lru_width": HIDDEN, "conv1d_width": 4,
    # vision / audio towers (sub-configs)
    "image_size": 28, "patch_size": 14, "num_channels": 3, "spatial_merge_size": 1, "temporal_patch_size": 1,
    "num_mel_bins": 16, "vision_soft_tokens_per_image": 4, "audio_soft_tokens_per_image": 4, "mm_tokens_per_image": 4,
    "image_seq_length": 4,
    # vocabularies beside the main one
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16, "shape_vocab_size": 32,
    "pronunciation_vocab_size": 32, "shape_embed_dim": 16, "pronunciation_embed_dim": 16, "rotary_dim": 8,
    # recurrent-depth models
    "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
    # byte-level models
    "hidden_size_global": HIDDEN, "encoder_hash_byte_group_vocab": 64,
    "use_cache": False,
    # logit transforms and extra loss terms: switched on, and away from 1, so that dropping one shows
    "logits_scaling": 2.5, "logit_scale": 0.5, "lm_head_multiplier": 0.7, "final_logit_softcapping": 3.0,
    "logits_soft_cap": 3.0, "output_logit_soft_cap": 3.0, "logits_mup_width_multiplier": 2.0,
    "z_loss_coefficient": 0.1, "dim_model_base": 32,
}
VOCAB_FIELDS = ("vocab_size",)


def _field_names(cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", {}))


def _token_fields(config: PretrainedConfig) -> dict[str, Any]:
    """Special token ids at or above LAST_ID, moved to distinct ids in [LAST_ID, VOCAB)."""
    out: dict[str, Any] = {}
    free = iter(range(VOCAB - 1, LAST_ID - 1, -1))
    seen: dict[int, int] = {}

    def remap(v: int) -> int:
        if v not in seen:
            seen[v] = next(free)
        return seen[v]

    for name, value in vars(config).items():
        if not (name.endswith("_token_id") or name.endswith("_token_index") or name.endswith("_token_ids")
                or name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id")):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= LAST_ID:
            out[name] = remap(value)
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[name] = [remap(v) if v >= LAST_ID else v for v in value]
    return out


_DEPTH_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "num_decoder_layers")


def _is_derived(cls: type, name: str) -> bool:
    """A property (possibly behind ``attribute_map``): computed from other fields, never passed."""
    target = getattr(cls, "attribute_map", {}).get(name, name)
    return isinstance(getattr(cls, name, None), property) or isinstance(getattr(cls, target, None), property)


def _per_layer(config: PretrainedConfig, kwargs: dict[str, Any]) -> None:
    """Lists with one entry per layer (``layer_types``, ``mlp_layer_types``, per-layer sizes) are resampled so
    that every kind of layer they name appears once in the tiny model, whose depth becomes their length."""
    depth = next((getattr(config, k) for k in _DEPTH_FIELDS if isinstance(getattr(config, k, None), int)), None)
    if not depth:
        return
    lists = {
        name: value for name, value in vars(config).items()
        if isinstance(value, list) and len(value) == depth and depth > 1 and not _is_derived(type(config), name)
        and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value)
    }
    if not lists:
        return
    kinds = {name: list(dict.fromkeys(value)) for name, value in lists.items()}
    n = max(2, *(len(k) for name, k in kinds.items() if isinstance(lists[name][0], str)), 2)
    for name, value in lists.items():
        if isinstance(value[0], str):
            kwargs[name] = [kinds[name][i % len(kinds[name])] for i in range(n)]
        else:  # per-layer numbers: the tiny size where it is one, else the first layer's value
            kwargs[name] = [SIZES.get(name, value[0])] * n
    for key in _DEPTH_FIELDS:
        if key in kwargs:
            kwargs[key] = n


def tiny_kwargs(config: PretrainedConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor keyword arguments that make ``type(config)`` tiny (``config``: its default instance;
    ``extra``: fields set last, a dict value for a sub-config's name applying to that sub-config)."""
    extra = dict(extra or {})
    cls = type(config)
    names = _field_names(cls) | set(vars(config))
    kwargs: dict[str, Any] = {k: v for k, v in SIZES.items() if k in names and not _is_derived(cls, k)}
    if "q_lora_rank" in vars(config) and vars(config)["q_lora_rank"] is None:
        kwargs.pop("q_lora_rank")  # a config without the low-rank query projection keeps it off
    if "image_size" not in names:
        kwargs.pop("patch_size", None)  # a vision tower's patch; elsewhere (byte patches) the default stays
    if "qk_rope_head_dim" in kwargs:  # multi-head latent attention: its own head_dim, as many kv heads as heads
        kwargs.pop("head_dim", None)
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    if "vocab_size" in names and getattr(config, "vocab_size", None):
        kwargs["vocab_size"] = VOCAB
    kwargs.update(_token_fields(config))
    _per_layer(config, kwargs)
    for name, value in vars(config).items():  # sub-configs, shrunk the same way
        if isinstance(value, PretrainedConfig):
            kwargs[name] = type(value)(**tiny_kwargs(value, extra.pop(name, None)))
    kwargs.update(extra)
    return kwargs


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of ``model_type`` (``OVERRIDES`` and ``overrides`` applied last)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = _default_config(cls)
    kwargs = tiny_kwargs(default, {**OVERRIDES.get(model_type, {}), **overrides})
    config = cls(**kwargs)
    _set_eager(config)
    return config


def _default_config(cls: type) -> PretrainedConfig:
    try:
        return cls()
    except Exception:  # a default that does not validate (e.g. an inconsistent architecture): skip validation
        return cls.__new__(cls)


def _set_eager(config: PretrainedConfig) -> None:
    """Eager attention everywhere: deterministic, and the same code for stock and patched."""
    config._attn_implementation = "eager"
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            _set_eager(value)


#: model_type -> extra constructor fields the generic shrinking cannot guess
OVERRIDES: dict[str, dict[str, Any]] = {
    # the modeling code reads attn_config.rope_theta, and clamps with clip_qkv
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}},
    "dory": {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "dots3_note": {
        "text_config": {"num_key_value_heads": 4},
        "vision_config": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN, "adapter_merge_size": 1},
        "audio_config": {"adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN},
    },
    "dots3_note_text": {"num_key_value_heads": 4},
    "flint": {"mlp_only_layers": [0]},  # one dense layer, one MoE layer
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma3n": {"text_config": {"num_kv_shared_layers": 0}},
    "zaya": {"num_experts_per_tok": 1},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
              "attention_head_dim": 32},  # shared attention twice, on the concatenated (2 x hidden) stream
    "reformer": {"is_decoder": True, "axial_pos_shape": [2, 4], "axial_pos_embds_dim": [32, 32],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2,
                 "attn_layers": ["local", "local"], "hidden_dropout_prob": 0.0, "local_attention_probs_dropout_prob": 0.0},
    # (its training step reseeds from torch.seed(): LSH rotations and dropout masks are not reproducible)
    "qwen2_vl": {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                     "rope_theta": 10000.0}}},
    "qwen2_5_vl": {"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                       "rope_theta": 10000.0}}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "longcat_flash": {"head_dim": 8},  # its rotary embedding reads head_dim (= qk_rope_head_dim)
    "mamba2": {"num_heads": 8},  # num_heads * head_dim == expand * hidden_size
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 4, "indexer_compress_ratio": 2}},
}
