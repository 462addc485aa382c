"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.families import make_tiny_chat_llama


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which CPU the suite ran on: kernels (oneDNN, bitsandbytes) differ between AVX2 and AVX-512
    hosts, and every test must hold on both."""
    import torch

    try:
        words = set(open("/proc/cpuinfo").read().split())
    except OSError:
        words = set()
    flags = [flag for flag in CPU_FLAGS if flag in words] or ["unknown"]
    try:
        from bitsandbytes.functional import has_avx512bf16

        bnb = "yes (loraswap keeps float32 compute)" if has_avx512bf16() else "no"
    except ImportError:
        bnb = "not installed"
    return [
        f"cpu: {' '.join(flags)}; torch capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}; bitsandbytes AVX512-BF16 path: {bnb}"
    ]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (config.json, safetensors, SmolLM2 tokenizer and chat template)."""
    return make_tiny_chat_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module", autouse=True)
def isolated_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default adapter store of in-process servers is a fresh temp folder per test module,
    never the user's (server processes get their own: tests/e2e/server_process.py)."""
    folder = tmp_path_factory.mktemp("loraswap-data")
    previous = os.environ.get("LORASWAP_DATA_DIR")
    os.environ["LORASWAP_DATA_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["LORASWAP_DATA_DIR"]
    else:
        os.environ["LORASWAP_DATA_DIR"] = previous


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache in offline mode, so nothing can reach a hub."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def seed_hub_cache(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """Put `source` in a huggingface_hub cache as repo_id's `main` at `commit`; the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
