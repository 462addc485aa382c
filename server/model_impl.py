"""`--model-impl auto|native|transformers`: which implementation computes a model folder.

native: a loraswap architecture spec (server/models/) exists for its `model_type`; transformers:
transformers' own modules around loraswap's KV cache, attention and LoRA slots
(server/hf_model.py), for any other decoder-only model transformers loads. auto picks native
when a spec exists; a spec that refuses a config (dynamic rope scaling, say) is final, since what
it refuses the other path would get wrong too. A model without a spec that the transformers-backed
path cannot serve either is refused with the reasons of both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from config.settings import Settings
from server.errors import NoNativeSpecError, UnsupportedModelError
from server.model_config import ModelConfig, load_model_config, read_config_json

Impl = Literal["native", "transformers"]


def _transformers_config(folder: Path) -> ModelConfig:
    from transformers import AutoConfig

    from server.hf_model import check_architecture, generic_config

    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"transformers cannot read {folder}/config.json: {str(exc).splitlines()[0]}") from exc
    check_architecture(hf_config)
    return generic_config(hf_config)


def model_architecture(requested: str, folder: Path) -> tuple[Impl, ModelConfig]:
    """The implementation that serves `folder` and the config the engine sizes itself by."""
    if requested == "transformers":
        return "transformers", _transformers_config(folder)
    try:
        return "native", load_model_config(folder)
    except NoNativeSpecError as native_reason:  # a spec that refuses a config says why; no fallback
        if requested == "native":
            raise
        model_type = read_config_json(folder).get("model_type")
        try:
            return "transformers", _transformers_config(folder)
        except UnsupportedModelError as hf_reason:
            raise UnsupportedModelError(
                f"{folder} (model_type {model_type!r}) cannot be served. native: {native_reason}. "
                f"transformers-backed: {hf_reason}") from hf_reason


def check_options(impl: Impl, settings: Settings) -> None:
    """What the transformers-backed path does not do, refused before loading."""
    if impl != "transformers":
        return
    refused = [flag for flag, on in (("--quantization", settings.quantization != "none"),
                                     ("--device-map", settings.device_map is not None),
                                     ("--compile", settings.compile),
                                     ("--max-module-slots", settings.max_module_slots > 0)) if on]
    if refused:
        raise UnsupportedModelError(
            f"{', '.join(refused)} need a native model spec; this model runs transformers-backed "
            "(--model-impl transformers or no spec for its family)")
