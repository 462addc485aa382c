"""What adapters a request asks for: one by name, or a weighted mix.

A mix is written in the `model` field as `name:weight+name:weight` (a weight may be left out: 1),
or given as the `adapters` extension field, a list of {"name", "weight"}. Adapter names never
contain ':' or '+' (adapters/store.py), so the compact form cannot be mistaken for a name. Pure
functions: parsing and the checks that need no adapter weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from server.errors import InvalidRequestError

MAX_MIX = 8  # adapters in one request
MAX_WEIGHT = 16.0  # |weight|, as |lora_scale|: far past any useful strength, well inside float16
MAX_MIX_CHARS = 8 * (64 + 1 + 24)  # the compact form of MAX_MIX names with long weights

Mix = tuple[tuple[str, float], ...]  # (adapter name, weight)


def is_mix(model: str) -> bool:
    return "+" in model or ":" in model


def parse_mix(model: str) -> Mix:
    """`name:0.7+other:0.5` -> (("name", 0.7), ("other", 0.5)), every term checked."""
    if len(model) > MAX_MIX_CHARS:
        raise InvalidRequestError(f"the model field is {len(model)} characters long; a mix of adapters is at most "
                                  f"{MAX_MIX_CHARS}", param="model")
    terms: list[tuple[str, float]] = []
    for term in model.split("+", MAX_MIX):
        name, sep, weight_text = term.partition(":")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise InvalidRequestError(f"the weight of {name[:64]!r} in the model field is not a number: "
                                          f"{weight_text[:24]!r} (write name:weight+name:weight)",
                                          param="model") from None
        terms.append((name, weight))
    return check_mix(terms, "model")


def check_mix(terms: Sequence[tuple[str, float]], param: str) -> Mix:
    """1 to MAX_MIX distinct names with finite weights in range (one weighted adapter is a mix
    of one: `name:0.5` scales it)."""
    if not terms or len(terms) > MAX_MIX:
        raise InvalidRequestError(f"a request mixes 1 to {MAX_MIX} adapters; got {len(terms)}"
                                  if terms else "the mix names no adapter", param=param)
    seen: set[str] = set()
    for name, weight in terms:
        if not name:
            raise InvalidRequestError("an adapter name in the mix is empty", param=param)
        if name in seen:
            raise InvalidRequestError(f"adapter {name[:64]!r} appears twice in the mix; give it one weight",
                                      param=param)
        seen.add(name)
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise InvalidRequestError(f"the weight of {name[:64]!r} must be a finite number from -{MAX_WEIGHT:g} to "
                                      f"{MAX_WEIGHT:g}; got {weight!r}", param=param)
    return tuple(terms)


def mix_label(terms: Mix) -> str:
    """The compact form of a mix (what responses name as their model)."""
    return "+".join(name if weight == 1.0 else f"{name}:{weight!r}" for name, weight in terms)


def check_scale(uses: Sequence[tuple[Any, float]], scale: float) -> None:
    """lora_scale scales one adapter, and not a DoRA one (its norm is fixed at scale 1). `uses`:
    (adapter ref, weight) of each adapter the request adds."""
    if scale == 1.0:
        if len(uses) == 1 and uses[0][1] != 1.0 and uses[0][0].weights.uses_dora:
            raise InvalidRequestError(f"{uses[0][0].name!r} is a DoRA adapter, which cannot be weighted: its norm is "
                                      "taken at weight 1", param="model")
        return
    if not uses:
        raise InvalidRequestError("lora_scale scales an adapter; this request names the base model", param="lora_scale")
    if len(uses) > 1:
        raise InvalidRequestError("lora_scale scales one adapter; give a mix its weights instead", param="lora_scale")
    if abs(uses[0][1] * scale) > MAX_WEIGHT:
        raise InvalidRequestError(f"the adapter's weight times lora_scale is {uses[0][1] * scale:g}; at most "
                                  f"{MAX_WEIGHT:g} in size", param="lora_scale")
    if uses[0][0].weights.uses_dora:
        raise InvalidRequestError(f"{uses[0][0].name!r} is a DoRA adapter, which cannot be scaled: its norm is "
                                  "taken at scale 1", param="lora_scale")
