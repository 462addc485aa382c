from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a converted folder (converted once per cache)."""
    from server.model_source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (tied embeddings, vocab 96) as a Hugging Face folder, read-only."""
    from tests.server.families import make_family

    folder = tmp_path_factory.mktemp("tiny")
    make_family("llama-tied", folder)
    return folder
