"""Microsoft Phi-3, Phi-3.5 and Phi-4-mini (model_type phi3).

The checkpoints store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, and adapters
trained on them target those fused names. Long-context variants use LongRoPE: per-frequency
divisors for sequences within the original context (`short_factor`) and beyond it
(`long_factor`). transformers switches between them by the length of the sequence being run;
a server cannot (a sequence's cached keys would change meaning as it grows), so loraswap picks
once per server: short factors when --max-model-len fits the original context, long ones
otherwise (server/rope.py). Phi-4-mini rotates only part of each head (`partial_rotary_factor`).
"""

from __future__ import annotations

from typing import Any

from server.model_config import ModelConfig, activation, base_fields, partial_rotary_dim, rope_config, rope_parameters
from server.model_config import window_size
from server.models import Family


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = base_fields(raw)
    rotary = partial_rotary_dim(raw, base["head_dim"])
    params = rope_parameters(raw)
    if params.get("rope_type", params.get("type")) == "yarn":  # transformers' Phi-3 reads it as LongRoPE
        params["rope_type"] = "longrope"
    rope = rope_config(params, max_position_embeddings=base["max_position_embeddings"],
                       rotary_dim=rotary or base["head_dim"])
    window = window_size(raw) if raw.get("sliding_window") else None
    bias = bool(raw.get("attention_bias") or False)
    return ModelConfig(
        **base,
        qkv_bias=bias, o_bias=bias, mlp_bias=False,
        activation=activation(raw, "hidden_act"),
        fused_checkpoint=True,
        layer_windows=(window,) * base["num_hidden_layers"] if window else (),
        ropes=(rope,),
        rotary_dim=rotary,
    )


FAMILY = Family("Phi-3, Phi-3.5, Phi-4-mini", ("phi3",), parse)
