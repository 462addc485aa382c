"""The architecture specs of the natively served families, one module each.

A spec (`Family`) names the `model_type`s it serves and turns their config.json into a
family-neutral `ModelConfig` (server/model_config.py): everything family-specific is decided
there, once. Adding a family is one module here, listed in FAMILIES, plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import NoNativeSpecError, UnsupportedModelError
from server.model_config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str  # for messages and the README, e.g. "Gemma 2 / Gemma 3"
    model_types: tuple[str, ...]
    parse: Callable[[dict[str, Any]], ModelConfig]

    def config(self, raw: dict[str, Any]) -> ModelConfig:
        """parse(raw), with a config.json field of the wrong type or out of range reported as
        what it is rather than as a traceback."""
        try:
            cfg = self.parse(raw)
        except UnsupportedModelError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
            raise UnsupportedModelError(f"config.json of {raw.get('model_type')!r} has an invalid field: "
                                        f"{type(exc).__name__}: {exc}") from exc
        check_sizes(cfg)
        return cfg


def check_sizes(cfg: ModelConfig) -> None:
    """What no single field check sees: the rotated features must pair up within a head (the
    sizes, eps and windows are checked as they are read, in server/model_config.py)."""
    if cfg.head_dim < 2 or cfg.head_dim % 2 or cfg.rot_dim < 2 or cfg.rot_dim % 2 or cfg.rot_dim > cfg.head_dim:
        raise UnsupportedModelError(f"head_dim {cfg.head_dim} (rotated {cfg.rot_dim}) must be even and positive")


def _families() -> list[Family]:
    from server.models import gemma, granite, llama, olmo2, phi3

    return [llama.FAMILY, gemma.FAMILY, phi3.FAMILY, granite.FAMILY, olmo2.FAMILY]


# model_types that are vision-language or otherwise not a decoder-only text model: refused by name.
NOT_TEXT_ONLY: dict[str, str] = {
    "gemma3": "a Gemma 3 vision-language checkpoint; serve a text-only one (model_type gemma3_text, e.g. "
    "gemma-3-270m or gemma-3-1b)",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for family in _families() for t in family.model_types)


def family_for(raw: dict[str, Any]) -> Family:
    """The spec serving this config, or UnsupportedModelError saying what is supported."""
    model_type = raw.get("model_type")
    for family in _families():
        if model_type in family.model_types:
            return family
    if model_type in NOT_TEXT_ONLY:
        raise UnsupportedModelError(f"model_type {model_type!r} is {NOT_TEXT_ONLY[model_type]}")
    raise NoNativeSpecError(
        f"model_type {model_type!r} has no native spec; native families: "
        + "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in _families())
    )
