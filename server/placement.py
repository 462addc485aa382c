"""Where each part of the model lives: `--device-map auto|cpu|cuda|cuda:N|<file.json>`.

This module is the pure planner; `server/device_map.py` sizes the parts and lists the devices,
and `Transformer.place` puts the weights where a placement says.

A Llama-family decoder is a chain: embedding -> layers 0..L-1 -> final norm -> lm_head. Each part
lives on one device, and a layer's KV cache and LoRA slot tensors live with its weights, so the
hidden state is the only tensor that crosses devices, and only at the "boundaries" where
consecutive parts differ. Keeping layers contiguous keeps those crossings at (devices used - 1).

Policy of `plan_auto` (greedy, in the order the devices are given):
* a device may fill (1 - headroom) of its free bytes; the rest is for activations, sampling and
  allocator fragmentation, which are not known when planning;
* the embedding goes on the first device; layers follow in order and move to the next device only
  when the next layer does not fit on the current one. For an ordered, contiguous split this
  places the longest possible prefix on each device, so it fails only when no such split exists;
* the final norm and an untied lm_head follow the last layer (planned as part of it, so they never
  add a crossing); a tied lm_head IS the embedding weight, so it stays with the embedding.

The planner is pure (sizes in bytes in, device names out) and imports nothing from torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

GIB = 1 << 30
EMBED, LAYERS, NORM, LM_HEAD = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
_DEVICE = re.compile(r"cpu|cuda(?::([0-9]+))?")
_LAYER_KEY = re.compile(r"model\.layers\.([0-9]+)(?:-([0-9]+))?")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
T = TypeVar("T")


class PlacementError(ValueError):
    """The model does not fit (the message says by how much), or a device map is wrong (it names
    the offending key or value)."""


@dataclass(frozen=True)
class DeviceBudget:
    name: str  # "cuda:0", "cuda:1", "cpu"
    free_bytes: int


@dataclass(frozen=True)
class PartSizes:
    embed: int  # embedding weights
    layers: list[int]  # per decoder layer: weights + its KV cache + its LoRA slot tensors
    norm: int
    lm_head: int  # 0 when tied to the embedding (then it sits with the embedding)
    tied: bool

    def __post_init__(self) -> None:
        if not self.layers:
            raise PlacementError("the model has no decoder layers")
        if min(self.embed, self.norm, self.lm_head, *self.layers) < 0:
            raise PlacementError("part sizes cannot be negative")
        if self.tied and self.lm_head:
            raise PlacementError("a tied lm_head is the embedding weight: its own size must be 0")

    @property
    def total(self) -> int:
        return self.embed + sum(self.layers) + self.norm + self.lm_head


@dataclass(frozen=True)
class Placement:
    embed: str
    layers: tuple[str, ...]
    norm: str
    lm_head: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # accept a list, stay hashable
        if not self.layers:
            raise PlacementError("a placement needs at least one layer")

    def devices(self) -> list[str]:
        """Distinct devices in first-use order (the order the hidden state visits them)."""
        return list(dict.fromkeys((self.embed, *self.layers, self.norm, self.lm_head)))

    def boundaries(self) -> list[int]:
        """Layers whose input arrives from another device (layer 0's input is the embedding's)."""
        before = (self.embed, *self.layers)
        return [i for i, device in enumerate(self.layers) if device != before[i]]

    def bytes_per_device(self, sizes: PartSizes) -> dict[str, int]:
        if len(sizes.layers) != len(self.layers):
            raise PlacementError(f"sizes give {len(sizes.layers)} layers, the placement {len(self.layers)}")
        totals = dict.fromkeys(self.devices(), 0)
        devices = (self.embed, *self.layers, self.norm, self.lm_head)
        for device, n in zip(devices, (sizes.embed, *sizes.layers, sizes.norm, sizes.lm_head)):
            totals[device] += n
        return totals

    def to_json(self) -> dict[str, str]:
        """Compact form with one key per run of layers; `parse_device_map` reads it back."""
        out = {EMBED: self.embed}
        out.update({_layer_key(a, b): device for a, b, device in _runs(self.layers)})
        out.update({NORM: self.norm, LM_HEAD: self.lm_head})
        return out


def canonical_device(name: str) -> str:
    """'cuda' means 'cuda:0', so that equal devices compare equal."""
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise PlacementError(f"unknown device {name!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return "cpu" if name == "cpu" else f"cuda:{int(match[1] or 0)}"


def single_device(device: str, num_layers: int) -> Placement:
    if num_layers < 1:
        raise PlacementError(f"the model needs at least one layer, got {num_layers}")
    device = canonical_device(device)
    return Placement(device, (device,) * num_layers, device, device)


def plan_auto(sizes: PartSizes, devices: list[DeviceBudget], *, headroom: float = 0.1) -> Placement:
    if not 0 <= headroom < 1:
        raise PlacementError(f"headroom must be in [0, 1), got {headroom}")
    if not devices:
        raise PlacementError("no devices to place the model on")
    names = [canonical_device(d.name) for d in devices]
    if len(set(names)) != len(names):
        raise PlacementError(f"a device is listed twice: {', '.join(names)}")
    usable = [_usable(d.free_bytes, headroom) for d in devices]
    _check_totals(sizes, names, usable, headroom)
    if sizes.embed > usable[0]:
        raise PlacementError(
            f"{EMBED} needs {_gib(sizes.embed)} GiB but the first device, {names[0]}, offers "
            f"{_gib(usable[0])} GiB usable: list a larger device first"
        )
    left = list(usable)
    left[0] -= sizes.embed
    tail = sizes.norm + sizes.lm_head  # lm_head is 0 when tied
    layers: list[str] = []
    k = 0
    for i, n in enumerate(sizes.layers):
        need = n + (tail if i == len(sizes.layers) - 1 else 0)
        while need > left[k]:  # the current device is full: move on, never back
            k += 1
            if k == len(names):
                raise PlacementError(
                    f"{LAYERS}.{i} needs {_gib(need)} GiB but {names[-1]}, the last device, has "
                    f"{_gib(left[-1])} GiB left; layers stay in order on consecutive devices, so "
                    f"{_gib(sum(left))} GiB spread over the devices cannot be used"
                )
        left[k] -= need
        layers.append(names[k])
    return Placement(names[0], tuple(layers), layers[-1], names[0] if sizes.tied else layers[-1])


def parse_device_map(
    raw: dict[str, str], num_layers: int, *, available: list[str] | None = None, tied: bool = False
) -> Placement:
    if not isinstance(raw, dict):
        raise PlacementError(f"a device map is an object of key -> device, got {type(raw).__name__}")
    if num_layers < 1:
        raise PlacementError(f"the model needs at least one layer, got {num_layers}")
    allowed = _allowed(available)
    layers: list[str | None] = [None] * num_layers
    owner: list[str | None] = [None] * num_layers  # the key that placed each layer, for overlap errors
    ends: dict[str, str] = {}
    fallback: str | None = None
    for key, value in raw.items():
        device = _map_device(key, value, allowed)
        if key in (EMBED, NORM, LM_HEAD):
            ends[key] = device
        elif key == LAYERS:
            fallback = device
        else:
            first, last = _layer_range(key, num_layers)
            for i in range(first, last + 1):
                if owner[i] is not None:
                    raise PlacementError(f"{owner[i]!r} and {key!r} both place {LAYERS}.{i}")
                owner[i], layers[i] = key, device
    placed = [device or fallback for device in layers]  # specific keys win over "model.layers"
    gaps = [_layer_key(a, b) for a, b, device in _runs(placed) if device is None]
    if gaps:
        raise PlacementError(f"no device for {', '.join(gaps)}: cover every layer or add a {LAYERS!r} key")
    full = [device for device in placed if device is not None]
    embed = ends.get(EMBED, full[0])
    lm_head = ends.get(LM_HEAD, embed if tied else full[-1])
    if tied and lm_head != embed:
        raise PlacementError(f"lm_head is tied to the embedding, so it must be on {embed}, not {lm_head}")
    return Placement(embed, tuple(full), ends.get(NORM, full[-1]), lm_head)


def load_device_map(
    spec: str, num_layers: int, *, available: list[str] | None = None, tied: bool = False
) -> Placement | None:
    """None for "auto" (the caller plans with sizes), else the placement `spec` names."""
    if spec == "auto":
        return None
    if _DEVICE.fullmatch(spec):
        return single_device(_map_device("--device-map", spec, _allowed(available)), num_layers)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PlacementError(f"--device-map {spec!r} is not auto, cpu, cuda, cuda:N or an existing JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlacementError(f"device map {spec}: cannot read JSON: {exc}") from exc
    if not isinstance(raw, dict):
        kind = _JSON_KINDS.get(type(raw), "null" if raw is None else type(raw).__name__)
        raise PlacementError(f'device map {spec}: expected a JSON object like {{"{LAYERS}": "cuda:0"}}, got {kind}')
    try:
        return parse_device_map(raw, num_layers, available=available, tied=tied)
    except PlacementError as exc:
        raise PlacementError(f"device map {spec}: {exc}") from exc


def _usable(free_bytes: int, headroom: float) -> int:
    # Fraction(repr(0.1)) is exactly 1/10, so "fits at 90%" is exact rather than off by a float ulp.
    return max(0, int(free_bytes * (1 - Fraction(repr(headroom)))))


def _check_totals(sizes: PartSizes, names: list[str], usable: list[int], headroom: float) -> None:
    """Errors a greedy pass would report less usefully: too little memory overall, one huge part."""
    total = sum(usable)
    if sizes.total > total:
        per = ", ".join(f"{name} {_gib(u)}" for name, u in zip(names, usable))
        raise PlacementError(
            f"the model needs {_gib(sizes.total)} GiB but the devices offer {_gib(total)} GiB usable "
            f"({per} after {headroom * 100:g}% headroom): {_gib(sizes.total - total)} GiB missing"
        )
    largest = max(usable)
    parts = {EMBED: sizes.embed, **{f"{LAYERS}.{i}": n for i, n in enumerate(sizes.layers)}}
    parts.update({NORM: sizes.norm, LM_HEAD: sizes.lm_head})
    for part, n in parts.items():
        if n > largest:
            raise PlacementError(
                f"{part} alone needs {_gib(n)} GiB but the largest device, {names[usable.index(largest)]}, "
                f"offers {_gib(largest)} GiB usable after {headroom * 100:g}% headroom"
            )


def _map_device(key: str, value: object, allowed: set[str] | None) -> str:
    try:
        device = canonical_device(value)  # type: ignore[arg-type]
    except PlacementError as exc:
        raise PlacementError(f"{key!r}: {exc}") from None
    if allowed is not None and device not in allowed:
        raise PlacementError(f"{key!r}: device {device!r} is not available (available: {', '.join(sorted(allowed))})")
    return device


def _allowed(available: list[str] | None) -> set[str] | None:
    return None if available is None else {canonical_device(a) for a in available}


def _layer_range(key: object, num_layers: int) -> tuple[int, int]:
    if not isinstance(key, str) or not key.startswith(LAYERS + "."):
        raise PlacementError(
            f"unknown key {key!r} in device map: expected {EMBED!r}, {LAYERS!r}, '{LAYERS}.N', "
            f"'{LAYERS}.A-B', {NORM!r} or {LM_HEAD!r}"
        )
    match = _LAYER_KEY.fullmatch(key)
    if match is None:
        raise PlacementError(f"bad layer key {key!r}: expected '{LAYERS}.N' or '{LAYERS}.A-B' (whole numbers)")
    first = int(match[1])
    last = first if match[2] is None else int(match[2])
    if first > last:
        raise PlacementError(f"bad layer range {key!r}: {first} > {last}")
    if last >= num_layers:
        raise PlacementError(f"{key!r} is out of range: the model has layers 0-{num_layers - 1}")
    return first, last


def _runs(values: Sequence[T]) -> list[tuple[int, int, T]]:
    """(first, last, value) for each run of equal consecutive values."""
    runs: list[tuple[int, int, T]] = []
    for i, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], i, value)
        else:
            runs.append((i, i, value))
    return runs


def _layer_key(first: int, last: int) -> str:
    return f"{LAYERS}.{first}" if first == last else f"{LAYERS}.{first}-{last}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"
