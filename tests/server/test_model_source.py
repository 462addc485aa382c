"""Resolving --model: local folders, hub ids through the cache, offline failures, bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.errors import ModelSourceError, UnsupportedModelError
from server.model_config import parse_model_config
from server.model_source import looks_like_hub_id, resolve_model
from server.weights import build_model
from tests.conftest import seed_hub_cache
from tests.server.families import make_family


def test_local_folder(tmp_path: Path) -> None:
    make_family("qwen2", tmp_path)
    assert resolve_model(str(tmp_path)) == tmp_path


def test_hub_id_offline_without_cache_fails_clearly(offline_hub: Path) -> None:
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        resolve_model("someorg/not-cached-model")


def test_hub_id_served_from_cache_offline(offline_hub: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_family("llama-tied", source)
    snapshot = seed_hub_cache(offline_hub, "someorg/tiny", source, "a" * 40)
    folder = resolve_model("someorg/tiny")
    assert folder.resolve() == snapshot.resolve()
    build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=16)


def test_missing_path_and_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="neither an existing folder nor a hub id"):
        resolve_model("./does/not/exist")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="lacks required fields: vocab_size"):
        build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=1, max_len=16)
    make_family("llama-tied", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UnsupportedModelError, match="never unpickles"):
        build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=1, max_len=16)


def test_hub_id_shape() -> None:
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_hub_id("just-a-name") and not looks_like_hub_id("./a/b")


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        parse_model_config({"model_type": "gpt2", "vocab_size": 10})
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in str(info.value)


def test_unsupported_rope_scaling_is_refused() -> None:
    raw = {
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
    }
    with pytest.raises(UnsupportedModelError, match="'dynamic' is not supported"):
        parse_model_config(raw)


def test_missing_tensor_is_reported(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    make_family("llama-tied", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="missing 1 tensors: model.layers.1.self_attn.qkv_proj.weight"):
        build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=1, max_len=16)


def test_embedded_model_folder(smollm_dir: Path) -> None:
    names = {p.name for p in smollm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (smollm_dir / "tokenizer_config.json").read_text()
    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
