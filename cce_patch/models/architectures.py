"""Architecture presets: real model families at their published shapes, for random-init models.

The recipe (``--model_config NAME``), the end-to-end benchmark (``cce-patch e2e --model NAME``) and the GPU runs
build models from these names, so that "Gemma-2-2B architecture" means the same numbers everywhere. The facts
come from the published configs (../shared/ANCHORS.md); nothing is downloaded. The ``tiny-*`` entries keep a
family's structure at a size that runs on a CPU in seconds.
"""

from __future__ import annotations

import inspect
from typing import Any

#: name -> (model_type, config fields). ``rope_theta`` only shapes the rotary table, but is kept so the model is
#: the real one.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2-2b": (
        "gemma2",
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rope_theta=10000.0,
        ),
    ),
    "llama3.2-1b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
    "llama3.1-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    # Tiny stand-ins with the same structure, for CPU smoke tests.
    "tiny-llama": (
        "llama",
        dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=512,
            rope_theta=10000.0,
        ),
    ),
    "tiny-gemma2": (
        "gemma2",
        dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=16,
            sliding_window=32,
            tie_word_embeddings=True,
            max_position_embeddings=512,
            rope_theta=10000.0,
        ),
    ),
}


def architecture_config(name: str, **overrides: Any):
    """The transformers config of preset ``name`` (``overrides`` replace fields, e.g. ``num_hidden_layers``);
    ``rope_theta`` goes where this transformers version wants it (``rope_parameters`` in 5.x, a plain field in
    4.x). Unknown names raise ValueError listing the presets."""
    from transformers import AutoConfig

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    model_type, fields = ARCHITECTURES[name]
    kwargs = {**fields, **overrides}
    cls = type(AutoConfig.for_model(model_type))
    theta = kwargs.pop("rope_theta")
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kwargs["rope_theta"] = theta
    return cls(**kwargs)
