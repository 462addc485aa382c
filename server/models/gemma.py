"""Google Gemma, Gemma 2 and Gemma 3 (text models).

Every RMSNorm scales by (1 + w); the embedding is multiplied by sqrt(hidden_size); the MLP gates
with tanh-approximated GELU; the embedding is the head. Gemma 2 and 3 add sandwich norms (the
attention and MLP outputs are normalized too, next to the pre-norms), a query scale of
`query_pre_attn_scalar ** -0.5`, and sliding-window layers between global ones (Gemma 2:
every other layer; Gemma 3: five of every six). Gemma 2 soft-caps attention scores and logits;
Gemma 3 normalizes each head of q and k and gives sliding layers their own rope base.
"""

from __future__ import annotations

from typing import Any

from server.errors import UnsupportedModelError
from server.model_config import (
    Activation,
    ModelConfig,
    RopeConfig,
    activation,
    base_fields,
    positive_float,
    rope_config,
    rope_parameters,
    single_rope,
    sliding_layers,
    window_size,
)
from server.models import Family


def _default_sliding(model_type: str, raw: dict[str, Any], layers: int) -> list[bool]:
    if model_type == "gemma2":
        return [i % 2 == 0 for i in range(layers)]
    if model_type == "gemma3_text":
        pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
        return [(i + 1) % pattern != 0 for i in range(layers)]
    return [False] * layers


def _gemma3_ropes(raw: dict[str, Any], max_len: int, dim: int) -> dict[str, RopeConfig]:
    """Rope parameters per layer type: transformers >= 5 keys `rope_parameters` by layer type;
    older files give the global base (`rope_theta`, `rope_scaling`) and a local one."""
    params = raw.get("rope_parameters") or {}
    if "full_attention" in params:
        by_type = {t: dict(params[t] or {}) for t in ("full_attention", "sliding_attention")}
    else:
        full = rope_parameters(raw)
        by_type = {"full_attention": full,
                   "sliding_attention": {"rope_theta": raw.get("rope_local_base_freq") or 10000.0}}
    return {t: rope_config(p, max_position_embeddings=max_len, rotary_dim=dim) for t, p in by_type.items()}


def _activation(raw: dict[str, Any]) -> Activation:
    # Gemma 1 files of transformers 4.38 say hidden_act "gelu" for what was always the tanh
    # approximation (transformers maps it so); Gemma 2/3 name it hidden_activation.
    if raw["model_type"] == "gemma" and not raw.get("hidden_activation") and raw.get("hidden_act") == "gelu":
        return "gelu_tanh"
    return activation(raw, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")


def parse(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention (an embedding model such as "
                                    "EmbeddingGemma) is not a decoder-only language model")
    base = base_fields(raw)
    base["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True))
    layers, head_dim, max_len = base["num_hidden_layers"], base["head_dim"], base["max_position_embeddings"]
    sliding = sliding_layers(raw, layers, _default_sliding(model_type, raw, layers))
    window = window_size(raw) if any(sliding) else None
    if model_type == "gemma3_text":
        by_type = _gemma3_ropes(raw, max_len, head_dim)
        ropes = (by_type["full_attention"], by_type["sliding_attention"])
        layer_ropes = tuple(int(s) for s in sliding)
    else:
        ropes, layer_ropes = (single_rope(raw, base),), ()
    later = model_type != "gemma"
    bias = bool(raw.get("attention_bias") or False)
    return ModelConfig(
        **base,
        qkv_bias=bias, o_bias=bias, mlp_bias=False,
        qk_norm="head" if model_type == "gemma3_text" else "none",
        norm_placement="sandwich" if later else "pre",
        norm_offset=1.0, norm_upcast=True,
        activation=_activation(raw),
        embedding_multiplier=float(base["hidden_size"]) ** 0.5, embedding_multiplier_in_dtype=True,
        attention_scale=positive_float(raw, "query_pre_attn_scalar", float(head_dim)) ** -0.5 if later else None,
        # transformers' Gemma 3 never soft-caps attention scores, whatever its config says.
        attn_softcap=positive_float(raw, "attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=positive_float(raw, "final_logit_softcapping") if later else None,
        layer_windows=tuple(window if s else None for s in sliding) if window else (),
        ropes=ropes,
        layer_ropes=layer_ropes,
    )


FAMILY = Family("Gemma, Gemma 2, Gemma 3 (text)", ("gemma", "gemma2", "gemma3_text"), parse)
