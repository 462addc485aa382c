"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.families import make_tiny_chat_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (config.json, safetensors, SmolLM2 tokenizer and chat template)."""
    return make_tiny_chat_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
