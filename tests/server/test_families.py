"""The family specs (server/models/): what each parses, that every feature the parity tests cover
really changes the logits, the rope variants against transformers' own, and the refusals.

Logits and greedy tokens of every family against transformers are in test_model_parity.py;
adapters against PEFT in tests/adapters/test_family_adapters.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from server.errors import UnsupportedModelError
from server.model_config import ModelConfig, RopeConfig, load_model_config, parse_model_config
from server.rope import inverse_frequencies
from server.weights import build_model
from tests.server.families import COMMON, FAMILIES, make_family
from tests.adapters.helpers import native_logits

NEW_FAMILIES = ["gemma", "gemma2", "gemma3", "granite", "olmo2", "phi3", "phi3-longrope", "phi4-mini"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    for name in NEW_FAMILIES:
        make_family(name, root / name)
    return {name: root / name for name in NEW_FAMILIES}


def test_each_spec_reads_its_features(folders: dict[str, Path]) -> None:
    cfg = {name: load_model_config(folder) for name, folder in folders.items()}
    g2, g3 = cfg["gemma2"], cfg["gemma3"]
    assert (g2.norm_placement, g2.norm_offset, g2.activation) == ("sandwich", 1.0, "gelu_tanh")
    assert g2.layer_windows == (8, None) and g2.attn_softcap == 0.15 and g2.final_softcap == 0.4
    assert g2.scale == 1.0 and g2.embedding_multiplier == 64**0.5 and g2.tie_word_embeddings
    assert g3.qk_norm == "head" and g3.layer_windows == (8, None) and g3.layer_ropes == (1, 0)
    assert [r.theta for r in g3.ropes] == [1e6, 1e4] and g3.ropes[0].type == "linear" and g3.attn_softcap is None
    assert cfg["gemma"].norm_placement == "pre" and cfg["gemma"].layer_windows == ()
    assert cfg["phi3"].fused_checkpoint and cfg["phi3"].layer_windows == (8, 8)
    assert cfg["phi3-longrope"].rope.type == "longrope" and cfg["phi3-longrope"].rope.factor == 4.0
    assert cfg["phi4-mini"].rot_dim == 12 and cfg["phi4-mini"].head_dim == 16
    granite = cfg["granite"]
    assert (granite.embedding_multiplier, granite.scale, granite.residual_multiplier, granite.logits_divisor) == (
        3.0, 2.0, 0.5, 4.0)
    assert (cfg["olmo2"].norm_placement, cfg["olmo2"].qk_norm) == ("post", "full")


# Each feature switched off (the checkpoint loads unchanged): the logits must move, so the parity
# tests, which pass with the feature on, could not pass without it.
ABLATIONS: list[tuple[str, dict[str, Any]]] = [
    ("gemma", dict(norm_offset=0.0)),
    ("gemma", dict(embedding_multiplier=1.0)),
    ("gemma", dict(activation="silu")),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("gemma2", dict(attention_scale=None)),
    ("gemma2", dict(layer_windows=())),
    ("gemma3", dict(layer_ropes=())),
    ("gemma3", dict(layer_windows=())),
    ("gemma3", dict(attention_scale=None)),
    ("granite", dict(embedding_multiplier=1.0)),
    ("granite", dict(residual_multiplier=1.0)),
    ("granite", dict(attention_scale=None)),
    ("granite", dict(logits_divisor=1.0)),
    ("phi3", dict(layer_windows=())),
    ("phi4-mini", dict(rotary_dim=None)),
]


@pytest.mark.parametrize(("family", "change"), ABLATIONS, ids=[f"{f}-{next(iter(c))}" for f, c in ABLATIONS])
def test_every_feature_matters(folders: dict[str, Path], family: str, change: dict[str, Any]) -> None:
    folder = folders[family]
    cfg = load_model_config(folder)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(4))
    on = native_logits(build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=64), None, ids)
    off_model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=64, cfg=replace(cfg, **change))
    off = native_logits(off_model, None, ids)
    assert (on - off).abs().max().item() > 1e-3


def test_longrope_picks_its_factor_set_by_the_longest_sequence_served(folders: dict[str, Path]) -> None:
    """Up to the original context (64 here) the short factors, beyond it the long ones (a choice
    per server: a sequence's cached keys must not change meaning as it grows)."""
    folder = folders["phi3-longrope"]
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(5))
    short = native_logits(build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=64), None, ids)
    long = native_logits(build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=128), None, ids)
    assert (short - long).abs().max().item() > 1e-3
    reference = make_family("phi3-longrope", folder.parent / "again")
    with torch.no_grad():  # transformers uses the long set once a sequence passes the original context
        expected = reference(torch.cat([ids, ids, ids], dim=1)).logits[:, -24:]
    got = native_logits(build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=128), None,
                        torch.cat([ids, ids, ids], dim=1))[:, -24:]
    assert (got - expected).abs().max().item() < 1e-4


def _hf_rope(rope_parameters: dict[str, Any], **extra: Any) -> tuple[torch.Tensor, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(**{**COMMON, "head_dim": 32, "max_position_embeddings": 4096,
                            "rope_parameters": rope_parameters, **extra})
    kind = rope_parameters["rope_type"]
    kwargs = {"seq_len": 5000} if kind == "longrope" else {}
    return ROPE_INIT_FUNCTIONS[kind](config, None, **kwargs)


ROPES: dict[str, dict[str, Any]] = {
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=512,
                        mscale=1.0, mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0),
    "longrope-long": dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=1024,
                          short_factor=[1.0 + i / 8 for i in range(16)], long_factor=[1.0 + i for i in range(16)]),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=1024),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_variants_equal_transformers(name: str) -> None:
    from server.model_config import rope_config

    params = ROPES[name]
    want_freq, want_factor = _hf_rope(dict(params))
    rope = rope_config(dict(params), max_position_embeddings=4096, rotary_dim=32)
    got_freq, got_factor = inverse_frequencies(32, rope, 5000)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(float(want_factor), rel=1e-9)


def test_refusals_say_what_is_supported() -> None:
    base = {**COMMON, "head_dim": 16}
    with pytest.raises(UnsupportedModelError, match=r"no native spec.*Gemma.*Phi-3.*Granite.*OLMo 2"):
        parse_model_config({**base, "model_type": "bert"})
    with pytest.raises(UnsupportedModelError, match="vision-language"):
        parse_model_config({**base, "model_type": "gemma3"})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        parse_model_config({**base, "model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="short_factor and long_factor need 8"):
        parse_model_config({**base, "model_type": "phi3", "rope_scaling": {
            "rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 64}})
    with pytest.raises(UnsupportedModelError, match="finite and positive"):
        parse_model_config({**base, "model_type": "llama", "rope_theta": float("nan")})
    with pytest.raises(UnsupportedModelError, match="logits_scaling must be a finite positive number"):
        parse_model_config({**base, "model_type": "granite", "logits_scaling": 0})
    with pytest.raises(UnsupportedModelError, match="layer_types must list 2"):
        parse_model_config({**base, "model_type": "gemma2", "sliding_window": 8, "layer_types": ["full_attention"]})
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads"):
        parse_model_config({**base, "model_type": "olmo2", "num_key_value_heads": 3})


HOSTILE: list[tuple[dict[str, Any], str]] = [
    (dict(model_type="llama", rope_scaling="linear"), "rope_scaling must be an object"),
    (dict(model_type="llama", hidden_act=["silu"]), "activation"),
    (dict(model_type="llama", head_dim="16"), "head_dim must be a positive integer"),
    (dict(model_type="llama", head_dim=15), "must be even"),
    (dict(model_type="llama", rms_norm_eps=float("nan")), "rms_norm_eps must be a finite positive number"),
    (dict(model_type="llama", max_position_embeddings=-4), "max_position_embeddings must be a positive integer"),
    (dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}),
     "finite and positive"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": float("inf")}),
     "finite and positive"),
    (dict(model_type="phi3", original_max_position_embeddings=1, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}), "original context > 1"),
    (dict(model_type="gemma3_text", sliding_window=8, sliding_window_pattern="six"), "invalid field"),
    (dict(model_type="gemma3_text", sliding_window=8, rope_parameters={"full_attention": 5, "sliding_attention": {}}),
     "invalid field"),
    (dict(model_type="gemma2", sliding_window=8, layer_types=[["full_attention"], "full_attention"]), "layer_types"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "not a decoder-only language model"),
    (dict(model_type="granite", eos_token_id=["two"]), "invalid field"),
]


@pytest.mark.parametrize(("fields", "message"), HOSTILE, ids=[f"{i}-{m[:20]}" for i, (_, m) in enumerate(HOSTILE)])
def test_hostile_config_fields_are_refused_with_what_is_wrong(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        parse_model_config({**COMMON, "head_dim": 16, **fields})


def test_gemma1_legacy_gelu_is_the_tanh_approximation() -> None:
    """transformers 4.38 wrote hidden_act "gelu" for Gemma 1, and transformers maps it so."""
    cfg = parse_model_config({**COMMON, "head_dim": 16, "model_type": "gemma", "hidden_act": "gelu",
                              "hidden_activation": None})
    assert cfg.activation == "gelu_tanh"


def test_older_gemma3_configs_give_the_same_model() -> None:
    """Hub files written before transformers 5: `sliding_window_pattern` and a local rope base."""
    old = {**COMMON, "model_type": "gemma3_text", "head_dim": 16, "num_hidden_layers": 6, "sliding_window": 8,
           "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg: ModelConfig = parse_model_config(old)
    assert cfg.layer_windows == (8, 8, None, 8, 8, None)
    assert cfg.ropes == (RopeConfig(theta=1e6, type="linear", factor=8.0, original_max_position_embeddings=256),
                         RopeConfig(theta=1e4, original_max_position_embeddings=256))
    assert cfg.layer_ropes == (1, 1, 0, 1, 1, 0)


def test_families_cover_every_native_model_type() -> None:
    from server.models import supported_model_types

    tested = {FAMILIES[name][0] for name in FAMILIES}
    configs = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
               "phi3": "Phi3Config", "granite": "GraniteConfig", "olmo2": "Olmo2Config"}
    assert set(supported_model_types()) == set(configs)
    assert {configs[t] for t in supported_model_types()} <= tested
