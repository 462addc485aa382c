"""Llama and the families built like it: Llama 2/3 (SmolLM), Mistral, Qwen2, Qwen3.

Pre-norm decoder layers, SiLU-gated MLP, rotary embeddings (default, linear, Llama 3, YaRN).
Qwen2 always has q/k/v biases (no o bias); Qwen3 normalizes each head of q and k; Mistral slides
one window over every layer.
"""

from __future__ import annotations

from typing import Any

from server.errors import UnsupportedModelError
from server.model_config import ModelConfig, activation, base_fields, partial_rotary_dim, single_rope, window_size
from server.models import Family


def parse(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    if raw.get("use_sliding_window") and model_type in ("qwen2", "qwen3"):
        raise UnsupportedModelError(
            f"{model_type} with use_sliding_window=true is not supported (windows from max_window_layers)"
        )
    base = base_fields(raw)
    rotary = partial_rotary_dim(raw, base["head_dim"])
    rope = single_rope(raw, base, rotary)
    bias = bool(raw.get("attention_bias") or False)
    window = window_size(raw) if model_type == "mistral" and raw.get("sliding_window") else None
    return ModelConfig(
        **base,
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=False if model_type == "qwen2" else bias,
        mlp_bias=bool(raw.get("mlp_bias") or False),
        qk_norm="head" if model_type == "qwen3" else "none",
        activation=activation(raw, "hidden_act"),
        layer_windows=(window,) * base["num_hidden_layers"] if window else (),
        ropes=(rope,),
        rotary_dim=rotary,
    )


FAMILY = Family("Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3", ("llama", "mistral", "qwen2", "qwen3"), parse)
