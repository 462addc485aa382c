"""Typed adapter errors; server/api/errors.py maps them to HTTP statuses."""

from __future__ import annotations

from server.errors import LoraswapError


class AdapterError(LoraswapError):
    """Base class of adapter problems."""


class InvalidAdapterError(AdapterError):
    """The adapter cannot be served; `problems` lists every reason found, not just the first."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.name = name
        self.problems = problems
        listing = "\n".join(f"- {p}" for p in problems)
        super().__init__(f"adapter {name!r} is invalid ({len(problems)} problem(s)):\n{listing}")


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is registered."""
