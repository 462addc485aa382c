"""The embedded model's conversion (server/gguf_convert.py) against transformers' own GGUF loader:
same tensors bit for bit, same config, tokenizer and chat template, and no `accelerate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from server.errors import ModelSourceError
from server.gguf_convert import gguf_to_hf_names, llama_hf_names, read_tensors, unpermute_rows
from server.model_source import EMBEDDED_GGUF, embedded_gguf_path

REPO_ROOT = Path(__file__).resolve().parents[2]


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k rows (the reference to undo)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


@pytest.mark.parametrize(("heads", "head_dim", "cols"), [(9, 64, 5), (3, 64, 7), (1, 4, 1), (4, 8, 0)])
def test_unpermute_undoes_llama_cpp_permutation(heads: int, head_dim: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)
    weights = rng.standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(weights, heads)
    assert not np.array_equal(permuted, weights) or head_dim == 2
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), weights)


def test_name_table_is_one_to_one() -> None:
    for tied in (True, False):
        mapping = gguf_to_hf_names(4, tied=tied)
        assert sorted(mapping.values()) == sorted(llama_hf_names(4, tied=tied))
        assert len(set(mapping)) == len(mapping)
    assert gguf_to_hf_names(2, tied=True)["blk.1.attn_q.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert gguf_to_hf_names(2, tied=False)["output.weight"] == "lm_head.weight"


def test_gemma3_gguf_reads_back_the_checkpoint(tmp_path: Path) -> None:
    """A Gemma 3 GGUF as llama.cpp writes one (gguf's names, every RMSNorm weight stored as 1 + w,
    q/k rows not permuted) reads back into the Hugging Face tensors it came from."""
    import gguf
    from safetensors.torch import load_file

    from tests.server.families import make_family

    make_family("gemma3", tmp_path / "hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    names = {v: k for k, v in gguf_to_hf_names(2, tied=True, architecture="gemma3").items()}
    assert sorted(names) == sorted(hf)

    def write(path: Path, rope_scale: float | None = None) -> Path:
        writer = gguf.GGUFWriter(str(path), "gemma3")
        if rope_scale is not None:
            writer.add_float32("gemma3.rope.scaling.factor", rope_scale)
        for hf_name, tensor in hf.items():
            stored = tensor + 1 if hf_name.endswith("norm.weight") else tensor
            writer.add_tensor(names[hf_name], stored.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    back = read_tensors(write(tmp_path / "gemma3.gguf"), num_heads=4, num_kv_heads=2, num_layers=2)
    assert back.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.allclose(back[name], tensor, atol=1e-6), name
    # 4B and larger carry a rope scaling that transformers' GGUF config parser would drop.
    with pytest.raises(ModelSourceError, match="rope scaling"):
        read_tensors(write(tmp_path / "scaled.gguf", 8.0), num_heads=4, num_kv_heads=2, num_layers=2)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported"):
        read_tensors(path, num_heads=1, num_kv_heads=1, num_layers=1)


CONVERT_WITHOUT_ACCELERATE = """
import sys
sys.modules["accelerate"] = None  # any import of accelerate now raises ImportError
from server.model_source import embedded_model_dir
print(embedded_model_dir())
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model converted from scratch into an empty cache, in a process where
    `accelerate` cannot be imported (the serve lock does not have it)."""
    cache = tmp_path_factory.mktemp("cache")
    # The environment of this process otherwise (tokenizer_config.json records local_files_only,
    # which follows HF_HUB_OFFLINE).
    env = {**os.environ, "LORASWAP_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", CONVERT_WITHOUT_ACCELERATE], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def test_conversion_equals_transformers_gguf_loader(converted: Path, tmp_path: Path) -> None:
    """transformers' own conversion (the recipe before this module, which needs accelerate) gives
    the same folder: tensors bit for bit, config, generation config, tokenizer, chat template."""
    pytest.importorskip("accelerate", reason="transformers' GGUF model loader needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=EMBEDDED_GGUF)
    reference = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    ours = load_file(converted / "model.safetensors")
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), name

    expected_config = model.config.to_dict()
    expected_config.pop("quantization_config", None)
    expected_config["architectures"] = [type(model).__name__]
    assert json.loads((converted / "config.json").read_text()) == json.loads(json.dumps(expected_config))
    model.generation_config.save_pretrained(tmp_path)
    assert json.loads((converted / "generation_config.json").read_text()) == json.loads(
        (tmp_path / "generation_config.json").read_text()
    )
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=EMBEDDED_GGUF).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (converted / name).read_bytes() == (tmp_path / name).read_bytes(), name
