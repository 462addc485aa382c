"""Typed adapter errors; server/api/errors.py maps them to HTTP statuses.

The root of every loraswap error lives here, in the lowest layer, so that `adapters/` never
imports `server/` (server/errors.py re-exports it).
"""

from __future__ import annotations

MAX_LISTED = 50


class LoraswapError(Exception):
    """Base class of every error loraswap raises on purpose."""


class SlotBudgetError(LoraswapError):
    """The LoRA memory budget (--lora-memory) holds no slot."""


class AdapterError(LoraswapError):
    """Base class of adapter problems."""


class InvalidAdapterError(AdapterError):
    """The adapter cannot be served; `problems` lists every reason found, not just the first."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.name = name
        self.problems = problems
        # A hostile file can produce thousands of problems: the message lists the first ones.
        shown = problems[:MAX_LISTED]
        listing = "\n".join(f"- {p}" for p in shown)
        if len(problems) > len(shown):
            listing += f"\n- ... and {len(problems) - len(shown)} more"
        super().__init__(f"adapter {name!r} is invalid ({len(problems)} problem(s)):\n{listing}")


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is registered."""
