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
    # modules_to_save: HF name -> (kind, vocabulary, hidden) of the modules served as full copies
    # ("embed", "head"); max_vocab: the rows a module slot holds (0: none, `no_module_slots` says why).
    full_modules: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    max_vocab: int = 0
    no_module_slots: str = "this server has no module slots"
    tied_embedding: bool = False  # the base's head is its embedding (trainable tokens follow PEFT's tying)


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
class FullModules:
    """The embedding and output head an adapter saved whole (modules_to_save), in the slot dtype."""

    vocab: int  # rows: the base vocabulary plus the adapter's added tokens
    embed: torch.Tensor | None = None  # [vocab, hidden]
    head: torch.Tensor | None = None  # [vocab, hidden]
    # Trainable tokens: only the new rows are kept (the module slot starts from the base embedding).
    token_ids: torch.Tensor | None = None  # [n] int64
    token_rows: torch.Tensor | None = None  # [n, hidden]
    tied_head: bool = False  # the head follows the embedding (trainable tokens on a tied base)

    @property
    def has_embed(self) -> bool:
        return self.embed is not None or self.token_rows is not None

    @property
    def has_head(self) -> bool:
        return self.head is not None or self.tied_head


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    config: LoraConfig
    modules: dict[str, ModuleLora]
    full: FullModules | None = None  # modules_to_save, served from a module slot

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_suffixes(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def uses_dora(self) -> bool:
        return any(m.dora is not None for m in self.modules.values())

    @property
    def vocab(self) -> int | None:
        """Token ids the adapter knows when it adds tokens (its saved embedding's rows), else None."""
        return None if self.full is None else self.full.vocab


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
    full, saved = _full_modules(config, raw, spec, problems)
    stray = sorted(set(raw.tensors) - set(modules) - set(unsupported) - saved)
    for module in stray:
        where = "is not in the base model" if module not in spec.targets and module not in spec.other_modules else (
            "is not targeted by adapter_config.json"
        )
        problems.append(f"weights for {module}: the module {where}")
    if not problems and not out and full is None:
        problems.append("the adapter changes no module")
    if problems:
        raise InvalidAdapterError(name, problems)
    return AdapterWeights(name=name, config=config, modules=out, full=full)


def _full_modules(config: LoraConfig, raw: RawAdapter, spec: SlotSpec,
                  problems: list[str]) -> tuple[FullModules | None, set[str]]:
    """modules_to_save checked: only the embedding and the head, saved whole, with the base's
    hidden size and its vocabulary plus at most the added tokens a module slot holds. An
    embedding or head saved whole without being listed counts too: PEFT saves them so when the
    vocabulary was resized (`save_embedding_layers`), and loading the adapter replaces the
    base's. Returns (the copies, the module names they were read from)."""
    saved = {m for m, pair in raw.tensors.items() if "W" in pair or "T" in pair}
    if config.trainable_token_indices:
        if config.modules_to_save:
            problems.append("modules_to_save and trainable_token_indices together are not supported")
            return None, saved
        return _trainable_tokens(config, raw, spec, problems), saved
    found = len(problems)
    everything = set(spec.targets) | spec.other_modules
    chosen = {m for m in saved if m in spec.full_modules and "W" in raw.tensors[m]}
    for module in sorted(m for m in saved if m not in spec.full_modules):
        problems.append(f"weights for {module}: a whole module is stored, but only the embeddings and the output "
                        "head can be served whole")
    for entry in config.modules_to_save:
        matched = [m for m in spec.full_modules if m == entry or m.endswith(f".{entry}")]
        if not matched:
            known = any(m == entry or m.endswith(f".{entry}") for m in everything)
            problems.append(f"modules_to_save: {entry!r} " + (
                "is not served: only the embeddings and the output head can be full copies "
                f"({', '.join(sorted(spec.full_modules)) or 'none on this model path'})" if known
                else "matches no module of the base model"))
        for module in matched:
            if "W" not in raw.tensors.get(module, {}):
                problems.append(f"modules_to_save lists {module} but its weight is missing")
    if (chosen or config.modules_to_save) and spec.max_vocab == 0:
        listed = list(config.modules_to_save) or sorted(chosen)
        problems.append(f"modules_to_save={listed}: {spec.no_module_slots}")
    if not chosen:
        return None, saved
    copies: dict[str, torch.Tensor] = {}
    for module in sorted(chosen):
        kind, vocab, hidden = spec.full_modules[module]
        weight = raw.tensors[module]["W"]
        if weight.shape[1] != hidden or not vocab <= weight.shape[0]:
            problems.append(f"{module}: the saved weight has shape {tuple(weight.shape)}, expected "
                            f"({vocab} or more rows, {hidden})")
        elif weight.shape[0] > max(spec.max_vocab, vocab):
            problems.append(f"{module}: {weight.shape[0] - vocab} added tokens; module slots hold "
                            f"{max(spec.max_vocab - vocab, 0)} (--max-added-tokens)")
        elif not bool(torch.isfinite(weight).all()):
            problems.append(f"{module}: the saved weight contains NaN or infinite values")
        elif float(weight.abs().max()) > torch.finfo(spec.dtype).max * WEIGHT_HEADROOM:
            problems.append(f"{module}: the saved weight is too large for {str(spec.dtype).removeprefix('torch.')}")
        else:
            copies[kind] = weight.to(spec.dtype).contiguous()
    sizes = {t.shape[0] for t in copies.values()}
    if len(sizes) > 1:
        problems.append(f"the saved embedding and head disagree on the vocabulary: {sorted(sizes)} rows")
    base_vocab = min((vocab for _, vocab, _ in spec.full_modules.values()), default=0)
    for kind, module in (("head", "lm_head"), ("embed", "embed_tokens")):
        if kind not in copies and any(size > base_vocab for size in sizes):
            problems.append(f"the adapter adds tokens but did not save {module}: the base model's has no rows for them")
    if len(problems) > found or not copies:
        return None, saved
    return FullModules(vocab=sizes.pop(), embed=copies.get("embed"), head=copies.get("head")), saved


def _trainable_tokens(config: LoraConfig, raw: RawAdapter, spec: SlotSpec, problems: list[str]) -> FullModules | None:
    """PEFT's trainable tokens: served from a module slot holding the base embedding with the
    chosen rows replaced (and the head too when it is tied to the embedding, as PEFT ties them);
    only the rows are kept here."""
    embeds = [m for m, (kind, _, _) in spec.full_modules.items() if kind == "embed"]
    if not embeds or spec.max_vocab == 0:
        problems.append(f"trainable_token_indices: {spec.no_module_slots if embeds else 'not served on this model path'}")
        return None
    module, (_, vocab, hidden) = embeds[0], spec.full_modules[embeds[0]]
    found = len(problems)
    for key in config.trainable_token_indices:
        if key and not (module == key or module.endswith(f".{key}")):
            problems.append(f"trainable_token_indices: {key!r} is not the base model's embedding ({module})")
    ids = [i for indices in config.trainable_token_indices.values() for i in indices]  # the delta's row order
    rows = raw.tensors.get(module, {}).get("T")
    if len(set(ids)) != len(ids):
        problems.append("trainable_token_indices lists a token id twice")
    if any(i >= vocab for i in ids):
        problems.append(f"trainable_token_indices: token ids past the vocabulary ({vocab}): {[i for i in ids if i >= vocab][:5]}")
    if rows is None:
        problems.append(f"{module}: trainable_token_indices is set but trainable_tokens_delta is missing")
    elif tuple(rows.shape) != (len(ids), hidden):
        problems.append(f"{module}: trainable_tokens_delta has shape {tuple(rows.shape)}, expected {(len(ids), hidden)}")
    elif not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) > torch.finfo(spec.dtype).max * WEIGHT_HEADROOM:
        problems.append(f"{module}: trainable_tokens_delta holds values that are not finite or too large")
    if len(problems) > found or rows is None:
        return None
    return FullModules(vocab=vocab, token_ids=torch.tensor(ids, dtype=torch.int64),
                       token_rows=rows.to(spec.dtype).contiguous(), tied_head=spec.tied_embedding)
