"""Typed server settings.

Every field can come from (highest priority first): command-line flags, `LORASWAP_<NAME>`
environment variables, a TOML config file (`--config`), then the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="forbid", frozen=True)

    model: str | None = Field(
        default=None,
        description="Local Hugging Face folder or hub id; empty means the embedded SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients use in `model`; defaults to the model folder's name."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    dtype: Dtype = "auto"
    device: Device = "auto"
    device_map: str | None = Field(
        default=None,
        description="auto, cpu, cuda, cuda:N or a JSON file mapping parts/layer ranges to devices; overrides device.",
    )
    max_num_seqs: int = Field(default=16, ge=1, le=1024, description="Rows decoded together.")
    max_model_len: int = Field(default=2048, ge=16, description="Prompt plus output tokens per row.")
    prefill_chunk: int = Field(default=512, ge=16, description="Prompt tokens prefilled per step.")
    max_loras: int = Field(default=8, ge=1, le=256, description="LoRA slots in every targeted layer.")
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Rank of every LoRA slot.")
    lora_modules: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters served by this run: name -> PEFT adapter folder (not kept for the next start).",
    )
    persist_lora_modules: bool = Field(
        default=False,
        description="Publish the lora_modules adapters into the adapter store, as an upload would: "
        "they are then served after a restart too.",
    )
    compile: bool = Field(default=False, description="torch.compile the model step.")
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        default="none", description="bitsandbytes quantization of the decoder projections."
    )
    quantize_lm_head: bool = Field(default=False, description="Quantize an untied lm_head too.")
    request_timeout: float | None = Field(
        default=600.0, gt=0, description="Seconds a request may run before it is cancelled (HTTP 408)."
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="On SIGTERM, seconds to let running requests finish."
    )
    max_waiting: int = Field(
        default=256, ge=1, description="Requests queued beyond the running rows; more get HTTP 429."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text, or one JSON object per line (uvicorn's included)."
    )
    data_dir: Path | None = Field(
        default=None, description="Adapter store; default $XDG_DATA_HOME/loraswap or ~/.local/share/loraswap."
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
