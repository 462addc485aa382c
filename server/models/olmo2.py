"""AllenAI OLMo 2: norms after the attention and MLP (not before), and q/k normalized over all
heads together before they are split into heads."""

from __future__ import annotations

from typing import Any

from server.model_config import ModelConfig, activation, base_fields, single_rope
from server.models import Family


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = base_fields(raw)
    rope = single_rope(raw, base)
    bias = bool(raw.get("attention_bias") or False)
    return ModelConfig(
        **base,
        qkv_bias=bias, o_bias=bias, mlp_bias=False,
        qk_norm="full", norm_placement="post", norm_upcast=True,
        activation=activation(raw, "hidden_act"),
        ropes=(rope,),
    )


FAMILY = Family("OLMo 2", ("olmo2",), parse)
