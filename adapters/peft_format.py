"""Reading PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

Only safetensors is read; a pickle file (`adapter_model.bin`) is refused, never opened.
Parsing collects problems rather than stopping at the first, so an operator sees them all.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from adapters.errors import InvalidAdapterError
from adapters.store import CONFIG_FILE, WEIGHTS_FILE
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# PEFT saves `base_model.model.<module>.lora_A.weight` (older files may keep the adapter name).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Keys PEFT writes for LoRA on embeddings, or for a wrapped layer's own weight (e.g. a targeted
# lm_head): they name a module the slots may not support; validation says so by module name.
_OTHER_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:lora_embedding_[AB](?:\.[^.]+)?|base_layer\.weight)$"
)


@dataclass(frozen=True)
class LoraConfig:
    """The inference-relevant part of a PEFT LoraConfig."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # list of names/suffixes, a regex, or "all-linear"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """Rank and alpha of one module after rank_pattern / alpha_pattern (PEFT's matching)."""
        rank = self.r
        for pattern, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                rank = int(value)
                break
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return rank, alpha

    def scaling(self, module: str) -> float:
        rank, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_config(raw: dict[str, Any], problems: list[str]) -> LoraConfig | None:
    """Check a PEFT adapter_config dict; append every problem found; None if unusable."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LORA adapters are supported")
    if raw.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported yet")
    if raw.get("modules_to_save"):
        problems.append(
            f"modules_to_save={raw['modules_to_save']!r}: fully fine-tuned modules cannot live in LoRA slots; "
            "retrain without modules_to_save"
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        problems.append(f"bias is {bias!r}; only bias='none' is supported")
    for key in ("target_parameters", "trainable_token_indices"):
        if raw.get(key):
            problems.append(f"{key} is not supported")
    r, alpha = raw.get("r"), raw.get("lora_alpha", 8)  # 8: PEFT's default lora_alpha
    if not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        problems.append(f"lora_alpha must be a number, got {alpha!r}")
    targets = raw.get("target_modules")
    if not targets:
        problems.append("target_modules is empty")
    if problems and not (isinstance(r, int) and isinstance(alpha, (int, float)) and targets):
        return None
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    pattern = raw.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = [pattern]
    return LoraConfig(
        r=int(r),  # type: ignore[arg-type]
        lora_alpha=float(alpha),  # type: ignore[arg-type]
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=tuple(pattern) if pattern else None,
        # PEFT itself ignores fan_in_fan_out for torch.nn.Linear targets (it warns and resets it).
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


@dataclass(frozen=True)
class RawAdapter:
    """What a folder holds, parsed but not yet checked against a base model."""

    config: LoraConfig
    # module name -> {"A": [r, in], "B": [out, r]} as stored (any float dtype)
    tensors: dict[str, dict[str, torch.Tensor]]
    # Problems found while reading that do not stop validation (it adds its own to these).
    problems: tuple[str, ...] = ()


def read_adapter_dir(folder: Path, name: str) -> RawAdapter:
    """Read and parse a PEFT adapter folder; raises InvalidAdapterError listing every problem."""
    problems: list[str] = []
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    config: LoraConfig | None = None
    if not config_path.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
    else:
        try:
            raw = json.loads(config_path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            config = parse_config(raw, problems)
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{CONFIG_FILE} is not valid JSON: {exc}")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    weights_readable = False
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
        if pickles:
            problems.append(
                f"{pickles[0]} is a pickle file, which loraswap never loads; convert it to "
                f"{WEIGHTS_FILE} (for example: PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True))"
            )
        else:
            problems.append(f"{WEIGHTS_FILE} is missing")
    else:
        weights_readable = _read_tensors(weights_path, tensors, problems)
    if config is None or not weights_readable:
        raise InvalidAdapterError(name, problems or ["unreadable adapter"])
    # Config and tensor-level problems so far travel on, so validation reports everything at once.
    return RawAdapter(config=config, tensors=tensors, problems=tuple(problems))


def _read_tensors(path: Path, tensors: dict[str, dict[str, torch.Tensor]], problems: list[str]) -> bool:
    """Fill `tensors` from a safetensors file; False if the file itself cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                match = _KEY.match(key)
                other = _OTHER_LORA_KEY.match(key) if match is None else None
                if other is not None:
                    tensors.setdefault(other["module"], {})
                    continue
                if match is None:
                    problems.append(f"unexpected tensor {key!r} (not a lora_A/lora_B weight)")
                    continue
                tensor = handle.get_tensor(key)
                if not tensor.is_floating_point():
                    problems.append(f"tensor {key!r} has dtype {tensor.dtype}; expected a float type")
                    continue
                tensors.setdefault(match["module"], {})[match["ab"]] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}")
        return False
    return True
