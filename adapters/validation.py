"""Check a parsed PEFT adapter against the slot bank of a base model, collecting every problem.

The result, `AdapterWeights`, holds per-module float32 A/B matrices with the LoRA scaling already
known, ready to be copied into a slot. Target matching follows PEFT's own rules (exact name or
`.name` suffix for lists, full-match for a regex string, "all-linear" = every projection but the
output layer, layers_to_transform / layers_pattern filtering).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from adapters import patterns
from adapters.dora import dora_factor
from adapters.errors import InvalidAdapterError
from adapters.peft_format import LoraConfig, RawAdapter

# |alpha / r| (or alpha / sqrt(r)) above this is no adapter anyone trained: refused.
MAX_SCALING = 1e4
# A slot value (A, or B with the scaling folded in) may use at most this fraction of its dtype's
# range, so that sums over ranks and features stay finite (float16: 65.5; float32: 3.4e35).
WEIGHT_HEADROOM = 1e-3


@dataclass(frozen=True)
class SlotSpec:
    """What the slot bank offers: LoRA-capable projections and their (in, out) sizes."""

    targets: dict[str, tuple[int, int]]  # HF module name -> (in_features, out_features)
    other_modules: frozenset[str]  # every other module name of the base (lm_head, embed_tokens, ...)
    max_rank: int
    dtype: torch.dtype = torch.float32  # what the slots hold
    # DoRA: (module, A # [r, in], scaled B^T # [r, out]) -> ||W + B A|| per output channel # [out]
    base_norms: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModuleLora:
    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32
    scaling: float
    dora: torch.Tensor | None = None  # [out] float32: DoRA's s = m / ||W + B A||; None for plain LoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @cached_property
    def slot_b(self) -> torch.Tensor:
        """s * B transposed, as a slot stores it # [r, out]; computed once (at validation), so a
        hotswap is plain copies."""
        return (self.b * self.scaling).t().contiguous()


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    config: LoraConfig
    modules: dict[str, ModuleLora]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_suffixes(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def uses_dora(self) -> bool:
        return any(m.dora is not None for m in self.modules.values())


def _matches(config: LoraConfig, module: str) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return True  # the caller offers only linear candidates
        return patterns.fullmatch(targets, module, "target_modules") is not None
    return module in targets or any(module.endswith(f".{t}") for t in targets)


def _layer_selected(config: LoraConfig, module: str) -> bool:
    if config.layers_to_transform is None or isinstance(config.target_modules, str):
        return True  # PEFT applies the layer filter to target lists only
    match = None
    for pattern in config.layers_pattern or (None,):
        regex = rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." if pattern else r".*?\.[^.]*\.(?P<idx>\d+)\."
        match = patterns.match(regex, module, "layers_pattern")
        if match:
            break
    return match is not None and int(match["idx"]) in config.layers_to_transform


def targeted_modules(config: LoraConfig, spec: SlotSpec, problems: list[str]) -> tuple[list[str], list[str]]:
    """(slot modules the adapter targets, targeted modules the slots cannot hold); appends problems
    for targets the base lacks or the slots cannot hold, or for patterns too costly to match."""
    candidates = list(spec.targets) + sorted(spec.other_modules)
    if config.target_modules == "all-linear":
        candidates = list(spec.targets)
    try:
        chosen = [m for m in candidates if _matches(config, m) and _layer_selected(config, m)]
    except patterns.PatternError as exc:
        problems.append(str(exc))
        return [], []
    if isinstance(config.target_modules, tuple):
        for target in config.target_modules:
            if not any(m == target or m.endswith(f".{target}") for m in candidates):
                problems.append(f"target module {target!r} does not exist in the base model")
    elif not chosen:
        problems.append(f"target_modules {config.target_modules!r} matches no module of the base model")
    unsupported = sorted({m.rsplit(".", 1)[-1] for m in chosen if m not in spec.targets})
    if unsupported:
        problems.append(
            f"LoRA on {', '.join(unsupported)} is not supported by the slots; supported targets: "
            f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in spec.targets}))}"
        )
    return [m for m in chosen if m in spec.targets], [m for m in chosen if m not in spec.targets]


def slot_value_problems(module: str, lora: ModuleLora, dtype: torch.dtype) -> list[str]:
    """What would go wrong when the module's A and scaled B are written into slots of `dtype`:
    values that are not finite there, or that use more than WEIGHT_HEADROOM of its range."""
    limit = torch.finfo(dtype).max * WEIGHT_HEADROOM
    found = []
    for label, tensor in (("lora_A", lora.a), ("lora_B x scaling", lora.slot_b)):
        biggest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not math.isfinite(biggest) or biggest > limit:
            found.append(f"{module}: {label} reaches {biggest:g}, too large for {str(dtype).removeprefix('torch.')} "
                         f"slots (at most {limit:g})")
    return found


def _check_magnitude(module: str, magnitude: torch.Tensor | None, d_out: int, problems: list[str]) -> None:
    if magnitude is None:
        problems.append(f"{module}: use_dora is true but its lora_magnitude_vector is missing")
    elif tuple(magnitude.shape) != (d_out,):
        problems.append(f"{module}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected {(d_out,)}")
    elif not bool(torch.isfinite(magnitude).all()):
        problems.append(f"{module}: lora_magnitude_vector contains NaN or infinite values")


def _with_dora(module: str, lora: ModuleLora, magnitude: torch.Tensor, spec: SlotSpec,
               problems: list[str]) -> ModuleLora:
    """The module's DoRA factor s = m / ||W + B A||, checked as a slot value."""
    if spec.base_norms is None:
        problems.append(f"{module}: DoRA needs the base weights, which this slot bank does not offer")
        return lora
    norms = spec.base_norms(module, lora.a, lora.slot_b)  # [out] float64
    if not bool((norms > 0).all()):
        problems.append(f"{module}: a row of W + B A has norm 0, so DoRA's magnitude cannot be applied")
        return lora
    factor = dora_factor(magnitude, norms)  # [out]
    limit = torch.finfo(spec.dtype).max * WEIGHT_HEADROOM
    biggest = float(factor.abs().max())
    if not math.isfinite(biggest) or biggest > limit:
        problems.append(f"{module}: the DoRA factor m / ||W + B A|| reaches {biggest:g} (at most {limit:g})")
        return lora
    return ModuleLora(a=lora.a, b=lora.b, scaling=lora.scaling, dora=factor)


def validate(raw: RawAdapter, spec: SlotSpec, name: str) -> AdapterWeights:
    """Every check against the base model; raises InvalidAdapterError with all problems at once.
    The config's patterns are matched within one time budget (adapters/patterns.py)."""
    with patterns.budget():
        return _validate(raw, spec, name)


def _validate(raw: RawAdapter, spec: SlotSpec, name: str) -> AdapterWeights:
    problems: list[str] = list(raw.problems)
    config = raw.config
    modules, unsupported = targeted_modules(config, spec, problems)
    out: dict[str, ModuleLora] = {}
    for module in modules:
        pair = raw.tensors.get(module, {})
        missing = [ab for ab in ("A", "B") if ab not in pair]
        if missing:
            problems.append(f"{module}: missing tensor(s) lora_{' and lora_'.join(missing)}")
            continue
        try:
            rank, alpha = config.rank_and_alpha(module)  # patterns matched once per module
        except patterns.PatternError as exc:
            problems.append(str(exc))
            break  # the same pattern would fail on every module
        d_in, d_out = spec.targets[module]
        a, b = pair["A"], pair["B"]
        found = len(problems)
        if tuple(a.shape) != (rank, d_in):
            problems.append(f"{module}: lora_A has shape {tuple(a.shape)}, expected {(rank, d_in)}")
        if tuple(b.shape) != (d_out, rank):
            problems.append(f"{module}: lora_B has shape {tuple(b.shape)}, expected {(d_out, rank)}")
        if rank > spec.max_rank:
            problems.append(f"{module}: rank {rank} exceeds the slot rank {spec.max_rank} (--max-lora-rank)")
        for label, tensor in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(tensor).all()):
                problems.append(f"{module}: {label} contains NaN or infinite values")
        scaling = config.scaling(rank, alpha)
        if not math.isfinite(scaling) or abs(scaling) > MAX_SCALING:
            problems.append(f"{module}: the LoRA scaling (lora_alpha / r) is {scaling:g}; at most {MAX_SCALING:g} in size")
        magnitude = pair.get("M")
        if config.use_dora:
            _check_magnitude(module, magnitude, d_out, problems)
        elif magnitude is not None:
            problems.append(f"{module}: a lora_magnitude_vector is stored but use_dora is false")
        if len(problems) == found:
            lora = ModuleLora(a=a.float().contiguous(), b=b.float(), scaling=scaling)
            problems += slot_value_problems(module, lora, spec.dtype)  # computes slot_b, off the engine thread
            if config.use_dora and len(problems) == found:
                lora = _with_dora(module, lora, magnitude, spec, problems)  # type: ignore[arg-type]
            out[module] = lora
    stray = sorted(set(raw.tensors) - set(modules) - set(unsupported))
    for module in stray:
        where = "is not in the base model" if module not in spec.targets and module not in spec.other_modules else (
            "is not targeted by adapter_config.json"
        )
        problems.append(f"weights for {module}: the module {where}")
    if not problems and not out:
        problems.append("the adapter changes no module")
    if problems:
        raise InvalidAdapterError(name, problems)
    return AdapterWeights(name=name, config=config, modules=out)
