"""What the native model needs to know of a checkpoint's architecture, whatever its family.

`ModelConfig` is family-neutral: sizes plus the features a family may switch on (norm placement
and offset, QK-norm, activation, multipliers, soft-capping, per-layer sliding windows and rope
tables, fused checkpoint projections). Each family's spec (server/models/<family>.py) turns its
config.json into one; the model, the weight loader, quantization, the device map and memory
accounting read only these fields and never name a family.

This module also holds the parsing helpers the specs share (required sizes, rope parameters in
the transformers 4 and 5 layouts, sliding-window layer patterns).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from server.errors import UnsupportedModelError

RopeType = Literal["default", "linear", "llama3", "yarn", "longrope"]
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "longrope")
NormPlacement = Literal["pre", "sandwich", "post"]
QKNorm = Literal["none", "head", "full"]
Activation = Literal["silu", "gelu_tanh", "gelu"]
ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu": "gelu",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # yarn and longrope: the cos/sin multiplier; None = derived from factor
    attention_factor: float | None = None
    # longrope: per-frequency divisors, for sequences within / beyond the original context
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


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
    qk_norm: QKNorm = "none"  # head: per-head RMSNorm of q and k; full: over all heads, before the split
    norm_placement: NormPlacement = "pre"  # pre: Llama; sandwich: Gemma 2/3; post: OLMo 2
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma stores w - 1
    norm_upcast: bool = False  # RMSNorm scales in float32, then casts (Gemma, OLMo 2); else casts, then scales
    activation: Activation = "silu"
    fused_checkpoint: bool = False  # the checkpoint (and its adapters) name qkv_proj and gate_up_proj
    embedding_multiplier: float = 1.0
    embedding_multiplier_in_dtype: bool = False  # rounded to the compute dtype first (Gemma's normalizer)
    residual_multiplier: float = 1.0
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # the same on the logits
    logits_divisor: float = 1.0
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = global; () = none
    ropes: tuple[RopeConfig, ...] = (RopeConfig(),)
    layer_ropes: tuple[int, ...] = ()  # per layer: index into ropes; () = ropes[0] everywhere
    rotary_dim: int | None = None  # None: head_dim (partial rotary embeddings rotate fewer)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rope(self) -> RopeConfig:
        """The first (for most models the only) rope table's parameters."""
        return self.ropes[0]

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def layer_rope(self, layer: int) -> int:
        return self.layer_ropes[layer] if self.layer_ropes else 0

    @cached_property  # read every step: computed once (the config is frozen)
    def windows(self) -> tuple[int | None, ...]:
        """The distinct attention windows, in first-layer order (a prompt chunk gets one mask each)."""
        return tuple(dict.fromkeys(self.layer_window(i) for i in range(self.num_hidden_layers))) or (None,)

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    def norm_names(self) -> tuple[str, ...]:
        """The RMSNorm modules of one decoder layer, by their checkpoint names."""
        return tuple(name for name in NORM_ROLES[self.norm_placement] if name is not None)


# placement -> the RMSNorm module (checkpoint name) of each role: (input, post-attention,
# pre-feedforward, post-feedforward), None where the placement has none. "post_attention_layernorm"
# is the MLP's input norm in Llama but normalizes the attention output in Gemma and OLMo 2: the
# checkpoints share the name, not the role.
NORM_ROLES: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


@dataclass(frozen=True)
class Projection:
    """One fused linear module of a decoder layer and the checkpoint projections stacked in it."""

    module: str  # e.g. "self_attn.qkv_proj"
    d_in: int
    parts: tuple[tuple[str, int], ...]  # (checkpoint projection name, output features), in order

    @property
    def d_out(self) -> int:
        return sum(size for _, size in self.parts)


def layer_projections(cfg: ModelConfig) -> list[Projection]:
    """The projections of one decoder layer: q/k/v fused in qkv_proj, gate/up in gate_up_proj.
    A checkpoint that ships them fused (`fused_checkpoint`) names the fused module itself, and so
    do the adapters trained on it. The one place this layout is written down."""
    q, kv, hidden, inter = cfg.q_size, cfg.kv_size, cfg.hidden_size, cfg.intermediate_size
    if cfg.fused_checkpoint:
        qkv: tuple[tuple[str, int], ...] = (("self_attn.qkv_proj", q + 2 * kv),)
        gate_up: tuple[tuple[str, int], ...] = (("mlp.gate_up_proj", 2 * inter),)
    else:
        qkv = (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv))
        gate_up = (("mlp.gate_proj", inter), ("mlp.up_proj", inter))
    return [
        Projection("self_attn.qkv_proj", hidden, qkv),
        Projection("self_attn.o_proj", q, (("self_attn.o_proj", hidden),)),
        Projection("mlp.gate_up_proj", hidden, gate_up),
        Projection("mlp.down_proj", inter, (("mlp.down_proj", hidden),)),
    ]


# --- parsing helpers shared by the family specs -------------------------------------------------


def eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    """`eos_token_id` of a config dict (an int, a list, or absent)."""
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _positive_int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def base_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The sizes every decoder-only config has, validated, as ModelConfig keyword arguments."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if raw.get(key) is None]
    if missing:
        raise UnsupportedModelError(f"config.json lacks required fields: {', '.join(missing)}")
    sizes = {key: _positive_int(raw, key) for key in required}
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    kv_heads = raw.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise UnsupportedModelError(f"num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}")
    head_dim = raw.get("head_dim") or hidden // heads
    max_len = raw.get("max_position_embeddings") or 2048
    for key, value in (("head_dim", head_dim), ("max_position_embeddings", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(f"config.json: {key} must be a positive integer, got {value!r}")
    return {
        "model_type": raw["model_type"],
        **sizes,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": positive_float(raw, "rms_norm_eps", 1e-6),
        "max_position_embeddings": max_len,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": eos_ids(raw),
    }


def activation(raw: dict[str, Any], *keys: str, default: str = "silu") -> Activation:
    name = next((raw[k] for k in keys if raw.get(k)), default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise UnsupportedModelError(f"config.json: {key} must be an object, got {type(value).__name__}")
    return value


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """One flat rope dict from either layout: transformers >= 5 writes `rope_parameters` (theta
    inside); older files write `rope_theta` plus an optional `rope_scaling` dict. A top-level
    `original_max_position_embeddings` wins, as transformers' standardization does."""
    params = {**_mapping(raw, "rope_scaling"), **_mapping(raw, "rope_parameters")}
    params.setdefault("rope_theta", raw.get("rope_theta") or 10000.0)
    if raw.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    return params


def rope_config(params: dict[str, Any], *, max_position_embeddings: int, rotary_dim: int) -> RopeConfig:
    """Validate one flat rope dict (see rope_parameters) into a RopeConfig."""
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if not isinstance(rope_type, str):
        raise UnsupportedModelError(f"rope_type must be a string, got {rope_type!r}")
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # Phi-3's first name for LongRoPE
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            " (dynamic scaling changes a sequence's positions as the batch grows)"
        )
    original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
    factor = params.get("factor")
    if factor is None:  # yarn and longrope derive it from the context extension
        factor = max_position_embeddings / original if rope_type in ("yarn", "longrope") else 1.0
    short, long = (tuple(float(f) for f in params.get(k) or ()) for k in ("short_factor", "long_factor"))
    if rope_type == "longrope" and not (len(short) == len(long) == rotary_dim // 2):
        raise UnsupportedModelError(
            f"longrope short_factor and long_factor need {rotary_dim // 2} entries each, got {len(short)} and {len(long)}"
        )
    optional = lambda key: None if params.get(key) is None else float(params[key])  # noqa: E731
    rope = RopeConfig(
        theta=float(params.get("rope_theta") or 10000.0), type=rope_type, factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)), attention_factor=optional("attention_factor"),
        short_factor=short, long_factor=long,
    )
    optional_values = (rope.mscale, rope.mscale_all_dim, rope.attention_factor)
    values = (rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor, rope.beta_fast, rope.beta_slow,
              *short, *long, *(v for v in optional_values if v is not None))
    if not all(math.isfinite(v) and v > 0 for v in values) or original < 2:
        raise UnsupportedModelError(f"rope parameters must be finite and positive (original context > 1): {params}")
    return rope


def single_rope(raw: dict[str, Any], base: dict[str, Any], rotary_dim: int | None = None) -> RopeConfig:
    """The one rope table of a model whose layers all share it, from its config dict and its
    base_fields; `rotary_dim`: rotated features per head when not all are."""
    return rope_config(rope_parameters(raw), max_position_embeddings=base["max_position_embeddings"],
                       rotary_dim=rotary_dim or base["head_dim"])


def partial_rotary_dim(raw: dict[str, Any], head_dim: int) -> int | None:
    """Rotated features per head when only a fraction is rotated (`partial_rotary_factor`), else None."""
    fraction = rope_parameters(raw).get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if fraction is None or float(fraction) == 1.0:
        return None
    dim = int(head_dim * float(fraction))
    if not 0 < dim <= head_dim or dim % 2:
        raise UnsupportedModelError(f"partial_rotary_factor {fraction!r} gives {dim} rotated features of {head_dim}")
    return dim


def sliding_layers(raw: dict[str, Any], num_layers: int, default: list[bool] | None = None) -> list[bool]:
    """Which layers use the sliding window: `layer_types` when the config lists them (transformers
    >= 5, and newer files), else `default` (the family's own pattern), else none."""
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers or not all(isinstance(t, str) for t in types):
            raise UnsupportedModelError(f"layer_types must list {num_layers} entries")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise UnsupportedModelError(f"layer types {sorted(unknown)} are not supported")
        return [t == "sliding_attention" for t in types]
    return default if default is not None else [False] * num_layers


def positive_float(raw: dict[str, Any], key: str, default: float | None = None) -> float | None:
    """A finite positive number from the config, `default` when absent or null."""
    value = raw.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise UnsupportedModelError(f"config.json: {key} must be a finite positive number, got {value!r}")
    return number


def window_size(raw: dict[str, Any]) -> int:
    value = raw.get("sliding_window")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"sliding_window must be a positive integer, got {value!r}")
    return value


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate a Hugging Face config dict with its family's spec (server/models/)."""
    from server.models import family_for

    if not isinstance(raw, dict):
        raise UnsupportedModelError("config.json must hold a JSON object")
    return family_for(raw).config(raw)


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{path} must hold a JSON object")
    return raw


def load_model_config(folder: Path) -> ModelConfig:
    return parse_model_config(read_config_json(folder))
