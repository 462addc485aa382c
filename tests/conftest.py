"""Fixtures shared by every test package: a tiny random-weight Llama checkpoint served like a real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The SmolLM2 tokenizer (49152 ids) and chat template, copied next to the tiny weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_VOCAB = 49152


def write_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer random-weight Llama with the embedded model's tokenizer into `folder`."""
    import torch
    import transformers

    from server.model_source import resolve_model

    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    embedded = resolve_model(None)  # converts the embedded model once if the cache lacks it
    for name in TOKENIZER_FILES:
        shutil.copy(embedded / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (config.json, safetensors, SmolLM2 tokenizer and chat template)."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
