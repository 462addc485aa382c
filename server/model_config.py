"""Architecture description of a Llama-family checkpoint, parsed from its config.json.

One frozen dataclass covers every supported family; the differences between them are flags
(qkv bias, q/k norm, sliding window, rope scaling) rather than subclasses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

RopeType = Literal["default", "linear", "llama3"]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_theta` plus an optional `rope_scaling` dict. Accept both.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta") or 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    """`eos_token_id` of a config dict (an int, a list, or absent)."""
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate a Hugging Face config dict and turn it into a ModelConfig."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; loraswap serves the Llama family: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM and Llama 2/3 use 'llama')"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu' is")
    if raw.get("use_sliding_window") and model_type in ("qwen2", "qwen3"):
        raise UnsupportedModelError(
            f"{model_type} with use_sliding_window=true is not supported (per-layer windows)"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in raw]
    if missing:
        raise UnsupportedModelError(f"config.json lacks required fields: {', '.join(missing)}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim") or hidden // heads
    attention_bias = bool(raw.get("attention_bias") or False)
    sliding = raw.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and no o bias; the others follow attention_bias.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(raw.get("mlp_bias") or False),
        qk_norm=model_type == "qwen3",
        sliding_window=int(sliding) if sliding else None,
        rope=_rope_from_hf(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids(raw),
    )


def load_model_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return parse_model_config(json.loads(path.read_text()))
