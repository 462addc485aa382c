"""IBM Granite 3: a Llama layout with four multipliers (embedding, attention scale, residual
branches, and a divisor of the logits)."""

from __future__ import annotations

from typing import Any

from server.model_config import ModelConfig, activation, base_fields, positive_float, single_rope
from server.models import Family


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = base_fields(raw)
    bias = bool(raw.get("attention_bias") or False)
    return ModelConfig(
        **base,
        qkv_bias=bias, o_bias=bias, mlp_bias=bool(raw.get("mlp_bias") or False),
        activation=activation(raw, "hidden_act"),
        embedding_multiplier=positive_float(raw, "embedding_multiplier", 1.0),
        residual_multiplier=positive_float(raw, "residual_multiplier", 1.0),
        attention_scale=positive_float(raw, "attention_multiplier", 1.0),
        logits_divisor=positive_float(raw, "logits_scaling", 1.0),
        ropes=(single_rope(raw, base),),
    )


FAMILY = Family("Granite 3", ("granite",), parse)
