"""Typed server settings.

Every field can come from (highest priority first): command-line flags, `LORASWAP_<NAME>`
environment variables, a TOML config file (`--config`), then the defaults below.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]

# Byte units of --lora-memory, case-insensitive: SI (powers of 1000) and IEC (powers of 1024).
BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MAX_LORA_MEMORY = 2**40  # 1 TiB: far above any device's memory, so larger is a typo
_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", frozen=True)

    model: str | None = Field(
        default=None,
        description="Local Hugging Face folder or hub id; unset: the embedded SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients use in `model`; unset: the model folder's name or hub id."
    )
    model_impl: Literal["auto", "native", "transformers"] = Field(
        default="auto",
        description="How the model computes: native (a loraswap spec: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3/4, "
        "Granite, OLMo 2), transformers (transformers' own modules around loraswap's KV cache, attention "
        "and LoRA slots: any decoder-only model it loads), auto: native when a spec exists.",
    )
    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 serves every interface.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    root_path: str = Field(
        default="", max_length=200, pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="Path prefix a proxy serves loraswap under (e.g. /loraswap; uvicorn's and FastAPI's root_path): "
        "the playground and the OpenAPI docs link under it.",
    )
    dtype: Dtype = Field(default="auto", description="Weight and compute dtype; auto: float32 on CPU, bfloat16 on CUDA.")
    device: Device = Field(default="auto", description="Where the model runs; auto: CUDA when visible, else the CPU.")
    device_map: str | None = Field(
        default=None,
        description="auto (spread over the visible GPUs), cpu, cuda, cuda:N or a JSON file mapping parts and "
        "layer ranges to devices; overrides device.",
    )
    max_num_seqs: int = Field(
        default=16, ge=1, le=1024,
        description="Requests running at once, at most (a cap: their KV memory comes from kv_cache_memory).",
    )
    max_model_len: int = Field(default=2048, ge=16, description="Prompt plus output tokens per request.")
    # The default is kept as written so --help shows it that way; validation turns it into bytes.
    kv_cache_memory: int = Field(
        default="1GiB",  # type: ignore[assignment]
        validate_default=True,
        description="Memory of the paged KV cache, all layers: bytes, or a size such as 512MiB or 4GiB. "
        "Requests take blocks of it as they grow; it is never made larger than max_num_seqs requests of "
        "max_model_len need. 1GiB holds about 23,300 positions of the embedded SmolLM2-135M in float32.",
    )
    block_size: int = Field(default=16, ge=1, le=1024, description="Positions per KV-cache block.")
    enable_prefix_caching: bool = Field(
        default=True,
        description="Share the KV blocks of a common prompt prefix between requests of the same adapter version.",
    )
    prefill_chunk: int = Field(
        default=32, ge=16,
        description="Prompt tokens in one prefill chunk (chunk boundaries are fixed per prompt, so its numbers never "
        "depend on what shares its steps); small chunks cost little, since a step's chunks share one forward.",
    )
    max_num_batched_tokens: int = Field(
        default=128,
        ge=16,
        le=65536,
        description="Tokens one engine step may carry: the decode tokens of running requests plus prompt "
        "chunks, which are never longer (vLLM's name). Smaller keeps running streams smoother while long "
        "prompts arrive, larger gives those prompts their first token sooner.",
    )
    long_prefill_token_threshold: int = Field(
        default=256, ge=0, le=1 << 20,
        description="Prompts longer than this are long (vLLM's name): while requests are decoding, a step carries "
        "at most one chunk of long prompts, so running streams keep their pace while long prompts arrive; "
        "0: long prompts fill the step budget like short ones.",
    )
    max_loras: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        default="auto",
        description="LoRA slots (adapters resident at once) in every targeted layer: a number, or auto to "
        "fit as many as lora_memory holds (at most 1024; at most 8 with compile, whose step computes "
        "every slot).",
    )
    # The default is kept as written so --help shows it that way; validation turns it into bytes.
    lora_memory: int = Field(
        default="1GiB",  # type: ignore[assignment]
        validate_default=True,
        description="Memory for all LoRA slots when max_loras is auto: bytes, or a size such as 512MiB, "
        "1GiB or 2GB. 1GiB gives the embedded SmolLM2-135M 12 slots of rank 64 in float32 (26 in "
        "bfloat16), more than the 8 slots loraswap used to fix, and costs a GPU little; an 8B model "
        "gets 2 rank-64 slots from it, so raise it on large GPUs or lower max_lora_rank.",
    )
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Rank of every LoRA slot.")
    max_module_slots: int = Field(
        default=0, ge=0, le=256,
        description="Module slots for adapters that save the whole embedding or output head (PEFT "
        "modules_to_save): each holds one such adapter's copies, 2 x vocabulary x hidden, so they are "
        "allocated only when asked for; 0 refuses such adapters.",
    )
    max_added_tokens: int = Field(
        default=0, ge=0, le=1 << 20,
        description="Tokens an adapter with a saved embedding or head may add to the vocabulary; "
        "widens every module slot by this many rows.",
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters served by this run: name -> PEFT adapter folder (not kept for the next start).",
    )
    persist_lora_modules: bool = Field(
        default=False,
        description="Publish the lora_modules adapters into the adapter store, as an upload would: "
        "they are then served after a restart too.",
    )
    compile: bool = Field(default=False, description="torch.compile the model step (meant for GPUs).")
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        default="none", description="bitsandbytes quantization of the decoder projections."
    )
    quantize_lm_head: bool = Field(
        default=False, description="Quantize an untied lm_head too (the embedding always stays unquantized)."
    )
    request_timeout: float | None = Field(
        default=600.0, gt=0, description="Seconds a request may run before it is cancelled (HTTP 408)."
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="On SIGTERM, seconds to let running requests finish."
    )
    max_waiting: int = Field(
        default=256, ge=1, description="Requests queued beyond the running rows; more get HTTP 429."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level of the log lines written."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text, or one JSON object per line (uvicorn's included)."
    )
    data_dir: Path | None = Field(
        default=None, description="Adapter store; unset: $XDG_DATA_HOME/loraswap or ~/.local/share/loraswap."
    )
    max_cpu_loras: int = Field(default=32, ge=1, description="Validated adapters cached in CPU memory (LRU).")
    adapter_roots: list[Path] = Field(
        default_factory=list, description="Folders the admin API may load adapters from by path."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token of the admin API; unset = admin from loopback only."
    )
    api_key: SecretStr | None = Field(default=None, description="Bearer token required by the inference API.")
    max_upload_mb: float = Field(default=1024, gt=0, description="Largest adapter weights file accepted.")

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        # Accept the CLI form ["name=path", ...] as well as a mapping (TOML table, JSON env).
        if isinstance(value, (list, tuple)):
            pairs = {}
            for item in value:
                name, sep, path = str(item).partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"--lora-modules takes NAME=PATH, got {item!r}")
                pairs[name] = path
            return pairs
        return value

    @field_validator("lora_memory", "kv_cache_memory", mode="before")
    @classmethod
    def _bytes(cls, value: object, info: ValidationInfo) -> int:
        return parse_bytes(value, name=info.field_name or "lora_memory")

    @field_validator("model", "served_model_name", "admin_token", "api_key", "device_map", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return value or None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if settings_cls.model_config.get("toml_file"):
            sources += (TomlConfigSettingsSource(settings_cls),)
        return sources


def parse_bytes(value: object, *, name: str = "lora_memory") -> int:
    """Bytes from an int or a string like `512MiB`, `1GiB`, `2GB`, `1.5GiB` or `1073741824`;
    positive and at most 1 TiB. Nothing is parsed as a float, so `inf` or `1e400` cannot slip in."""
    if isinstance(value, bool):  # an int to Python, but `lora_memory = true` is a mistake
        raise ValueError(f"{name} takes a size such as 1GiB, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        value = int(value)
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            raise ValueError(f"{name} must be positive, got {value[:40]!r}")
        match = _BYTES.fullmatch(text) if len(text) <= 40 else None
        if match is None or match[2] not in BYTE_UNITS:
            raise ValueError(f"{name} takes bytes or a number with a unit (B, kB, MB, GB, TB, KiB, MiB, GiB, "
                             f"TiB), e.g. 1GiB; got {value[:40]!r}")
        amount = math.floor(Fraction(match[1]) * BYTE_UNITS[match[2]])
    else:
        raise ValueError(f"{name} takes bytes or a size such as 1GiB, got {type(value).__name__}")
    if not 0 < amount <= MAX_LORA_MEMORY:
        raise ValueError(f"{name} must be between 1 byte and 1 TiB ({MAX_LORA_MEMORY} bytes), got {amount}")
    return amount


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`overrides`, None = not given), environment and an optional TOML file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return Settings(**given)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    with_file = type(
        "FileSettings",
        (Settings,),
        {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})},
    )
    return Settings(**with_file(**given).model_dump())
