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

from adapters import patterns
from adapters.errors import InvalidAdapterError
from adapters.store import CONFIG_FILE, WEIGHTS_FILE
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# PEFT saves `base_model.model.<module>.lora_A.weight` (older files may keep the adapter name).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# DoRA's magnitude per output channel: `<module>.lora_magnitude_vector` (older files: `.weight`
# after it, or the adapter name in between).
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
# PEFT's trainable tokens: the new rows of an embedding's chosen token ids.
_TOKENS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
# A module of modules_to_save, saved whole: `<module>.weight`; PEFT also writes the wrapper's
# `<module>.modules_to_save[.<adapter>].weight` (the same copy) and, when it saves embedding layers
# of a resized vocabulary, `<module>.original_module.weight` (the base's own, unused by the adapter).
_FULL_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)"
                       r"(?P<wrap>\.modules_to_save(?:\.[^.]+)?|\.original_module(?:\.[^.]+)?)?\.weight$")
# Keys PEFT writes for LoRA on embeddings, or for a wrapped layer's own weight (e.g. a targeted
# lm_head): they name a module the slots may not support; validation says so by module name.
_OTHER_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:lora_embedding_[AB](?:\.[^.]+)?|base_layer\.weight)$"
)


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_RANK = 1 << 16
MAX_LIST = 1024  # entries of target_modules, rank_pattern, alpha_pattern, layers_*
MAX_NAME_CHARS = 256  # one entry of a target_modules list
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json is a few hundred bytes in practice
MAX_KEY_CHARS = 1024  # a tensor name; the name patterns above stay fast below this


@dataclass(frozen=True)
class LoraConfig:
    """The inference-relevant part of a PEFT LoraConfig, every field checked (parse_config)."""

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
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # fully fine-tuned modules PEFT saved whole (names or suffixes)
    # PEFT's trainable tokens: embedding module (name or suffix; "" = the input embedding) -> token ids
    trainable_token_indices: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """Rank and alpha of one module after rank_pattern / alpha_pattern (PEFT's matching).
        Patterns match at a bounded cost (PatternError when one is too expensive)."""
        rank = self.r
        for key, value in self.rank_pattern.items():
            if patterns.match(rf"(.*\.)?({key})$", module, "rank_pattern"):
                rank = value
                break
        alpha = self.lora_alpha
        for key, number in self.alpha_pattern.items():
            if patterns.match(rf"(.*\.)?({key})$", module, "alpha_pattern"):
                alpha = number
                break
        return rank, alpha

    def scaling(self, rank: int, alpha: float) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA (rank and alpha from rank_and_alpha)."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_rank(value: object) -> bool:
    return _is_int(value) and 1 <= value <= MAX_RANK  # type: ignore[operator]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: object) -> str:
    """A value for an error message, cut short (a hostile config can be large)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _flag(raw: dict[str, Any], key: str, problems: list[str]) -> bool:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        problems.append(f"{key} must be true or false, got {_show(value)}")
        return False
    return bool(value)


def _string_list(value: object, key: str, problems: list[str], *, regexes: bool) -> tuple[str, ...] | None:
    """A string or a list of strings (PEFT accepts both for these fields)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        problems.append(f"{key} must be a string or a list of non-empty strings, got {_show(value)}")
        return None
    if len(items) > MAX_LIST:
        problems.append(f"{key} has {len(items)} entries (at most {MAX_LIST})")
        return None
    for item in items:
        if regexes:
            try:
                patterns.compile_pattern(item, key)
            except patterns.PatternError as exc:
                problems.append(str(exc))
                return None
        elif len(item) > MAX_NAME_CHARS:
            problems.append(f"{key}: an entry is {len(item)} characters long (at most {MAX_NAME_CHARS})")
            return None
    return tuple(items)


def _pattern_map(raw: dict[str, Any], key: str, problems: list[str], valid: Any, what: str) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: {regex: value}; every key compiles, every value is `what`."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key} must be an object mapping module patterns to values, got {_show(value)}")
        return {}
    if len(value) > MAX_LIST:
        problems.append(f"{key} has {len(value)} entries (at most {MAX_LIST})")
        return {}
    checked: dict[str, Any] = {}
    for pattern, number in value.items():
        try:
            patterns.compile_pattern(pattern, key)
        except patterns.PatternError as exc:
            problems.append(str(exc))
            continue
        if not valid(number):
            problems.append(f"{key}[{pattern[:80]!r}] must be {what}, got {_show(number)}")
            continue
        checked[pattern] = number
    return checked


def parse_config(raw: dict[str, Any], problems: list[str]) -> LoraConfig | None:
    """Check a PEFT adapter_config dict field by field (types, ranges, finiteness, regex syntax);
    append every problem found, each naming its field; None if unusable."""
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        problems.append(f"peft_type is {_show(peft_type)}; only LORA adapters are supported")
    use_dora = _flag(raw, "use_dora", problems)
    to_save = raw.get("modules_to_save")
    modules_to_save: tuple[str, ...] | None = ()
    if to_save is not None and (not isinstance(to_save, list) or not all(isinstance(m, str) and m for m in to_save)):
        problems.append(f"modules_to_save must be a list of module names or null, got {_show(to_save)}")
    elif to_save is not None:
        modules_to_save = _string_list(to_save, "modules_to_save", problems, regexes=False)
    bias = raw.get("bias", "none")
    if bias != "none":
        problems.append(f"bias is {_show(bias)}; only bias='none' is supported")
    if raw.get("target_parameters"):
        problems.append("target_parameters is not supported")
    trainable = _parse_token_indices(raw.get("trainable_token_indices"), problems)
    # The problems above are features loraswap refuses; those below make the config unusable
    # (validation then stops here instead of also checking the weights).
    structural = len(problems)
    r, alpha = raw.get("r"), raw.get("lora_alpha", 8)  # 8: PEFT's default lora_alpha
    if not _positive_rank(r):
        problems.append(f"r must be an integer from 1 to {MAX_RANK}, got {_show(r)}")
    if not _finite(alpha):
        problems.append(f"lora_alpha must be a finite number, got {_show(alpha)}")
    targets = _parse_targets(raw.get("target_modules"), problems)
    use_rslora = _flag(raw, "use_rslora", problems)
    rank_pattern = _pattern_map(raw, "rank_pattern", problems, _positive_rank, f"an integer from 1 to {MAX_RANK}")
    alpha_pattern = _pattern_map(raw, "alpha_pattern", problems, _finite, "a finite number")
    layers = _parse_layers(raw.get("layers_to_transform"), problems)
    pattern = raw.get("layers_pattern")
    layers_pattern = None if pattern is None else _string_list(pattern, "layers_pattern", problems, regexes=True)
    fan_in_fan_out = _flag(raw, "fan_in_fan_out", problems)
    base = raw.get("base_model_name_or_path")
    if len(problems) > structural or targets is None:
        return None
    return LoraConfig(
        r=int(r),  # type: ignore[arg-type]
        lora_alpha=float(alpha),  # type: ignore[arg-type]
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        layers_to_transform=layers,
        layers_pattern=layers_pattern or None,
        # PEFT itself ignores fan_in_fan_out for torch.nn.Linear targets (it warns and resets it).
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base if isinstance(base, str) else None,
        use_dora=use_dora,
        modules_to_save=modules_to_save or (),
        trainable_token_indices=trainable,
    )


def _parse_targets(value: object, problems: list[str]) -> tuple[str, ...] | str | None:
    """A regex string (or "all-linear"), or a list of module names / suffixes."""
    if value is None or value == [] or value == "":
        problems.append("target_modules is empty")
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                patterns.compile_pattern(value, "target_modules")
            except patterns.PatternError as exc:
                problems.append(str(exc))
                return None
        return value
    return _string_list(value, "target_modules", problems, regexes=False)


def _parse_token_indices(value: object, problems: list[str]) -> dict[str, tuple[int, ...]]:
    """trainable_token_indices: a list of token ids (the input embedding's) or {module: ids}."""
    if value is None:
        return {}
    by_module = {"": value} if isinstance(value, list) else value
    valid = isinstance(by_module, dict) and len(by_module) <= MAX_LIST and all(
        isinstance(k, str) and len(k) <= MAX_NAME_CHARS and isinstance(ids, list) and 0 < len(ids) <= MAX_RANK
        and all(_is_int(i) and 0 <= i < 1 << 31 for i in ids) for k, ids in by_module.items())
    if not valid:
        problems.append(f"trainable_token_indices must be a non-empty list of token ids or an object mapping "
                        f"embedding names to such lists, got {_show(value)}")
        return {}
    return {k: tuple(ids) for k, ids in by_module.items()}


def _parse_layers(value: object, problems: list[str]) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = [value] if _is_int(value) else value
    valid = isinstance(items, list) and len(items) <= MAX_LIST and all(_is_int(i) and 0 <= i < MAX_RANK for i in items)
    if not valid:
        problems.append(f"layers_to_transform must be a layer index or a list of layer indices, got {_show(value)}")
        return None
    return tuple(items) or None  # type: ignore[arg-type]


@dataclass(frozen=True)
class RawAdapter:
    """What a folder holds, parsed but not yet checked against a base model."""

    config: LoraConfig
    # module name -> {"A": [r, in], "B": [out, r], "M": [out] (DoRA), "W": [rows, cols] (modules_to_save),
    # "T": [tokens, hidden] (trainable tokens)} as stored (any float dtype)
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
        config = parse_config_file(config_path, problems)
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


def parse_config_file(path: Path, problems: list[str]) -> LoraConfig | None:
    """adapter_config.json, size- and depth-checked, then parse_config."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        problems.append(f"{CONFIG_FILE} is {size} bytes (at most {MAX_CONFIG_BYTES})")
        return None
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        problems.append(f"{CONFIG_FILE} is nested too deeply")
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {str(exc)[:200]}")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object, got {type(raw).__name__}")
        return None
    return parse_config(raw, problems)


def _dtype_problem(key: str, tensor: torch.Tensor) -> str | None:
    if tensor.dtype in WEIGHT_DTYPES:
        return None
    return (f"tensor {key[:200]!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "expected float16, bfloat16, float32 or float64")


def _read_full(handle: Any, key: str, problems: list[str], *, named: bool) -> torch.Tensor | None:
    """A whole module's weight matrix (modules_to_save; which modules may have one is
    validation's call), or None with a problem. `named`: the key has the form of one."""
    tensor = handle.get_tensor(key) if named else None
    if tensor is None or tensor.dim() != 2:
        problems.append(f"unexpected tensor {key[:200]!r} (not a lora_A/lora_B weight or a module's saved matrix)")
        return None
    if (problem := _dtype_problem(key, tensor)) is not None:
        problems.append(problem)
        return None
    return tensor


def _read_magnitude(handle: Any, key: str, module: dict[str, torch.Tensor], problems: list[str]) -> None:
    tensor = handle.get_tensor(key)
    if (problem := _dtype_problem(key, tensor)) is not None:
        problems.append(problem)
    elif tensor.dim() != 1:
        problems.append(f"tensor {key[:200]!r} has {tensor.dim()} dimensions; a DoRA magnitude is a vector")
    else:
        module["M"] = tensor


def _read_tensors(path: Path, tensors: dict[str, dict[str, torch.Tensor]], problems: list[str]) -> bool:
    """Fill `tensors` from a safetensors file; False if the file itself cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if len(key) > MAX_KEY_CHARS:
                    problems.append(f"a tensor name is {len(key)} characters long (at most {MAX_KEY_CHARS})")
                    continue
                match = _KEY.match(key)
                tokens = _TOKENS_KEY.match(key) if match is None else None
                if tokens is not None:
                    rows = _read_full(handle, key, problems, named=True)
                    if rows is not None:
                        tensors.setdefault(tokens["module"], {})["T"] = rows
                    continue
                magnitude = _MAGNITUDE_KEY.match(key) if match is None else None
                if magnitude is not None:
                    _read_magnitude(handle, key, tensors.setdefault(magnitude["module"], {}), problems)
                    continue
                other = _OTHER_LORA_KEY.match(key) if match is None else None
                if other is not None:
                    tensors.setdefault(other["module"], {})
                    continue
                if match is None:
                    full = _FULL_KEY.match(key)
                    if full is not None and (full["wrap"] or "").startswith(".original_module"):
                        continue  # the base's own module, as PEFT keeps it beside the copy
                    weight = _read_full(handle, key, problems, named=full is not None)
                    if weight is not None:
                        tensors.setdefault(full["module"], {})["W"] = weight  # type: ignore[index]
                    continue
                tensor = handle.get_tensor(key)
                if (problem := _dtype_problem(key, tensor)) is not None:
                    problems.append(problem)
                    continue
                if tensor.dim() != 2:
                    problems.append(f"tensor {key[:200]!r} has {tensor.dim()} dimensions; LoRA A and B are matrices")
                    continue
                tensors.setdefault(match["module"], {})[match["ab"]] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}")
        return False
    return True
