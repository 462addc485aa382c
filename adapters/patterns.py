"""Regular expressions from adapter configs, matched at a bounded cost.

PEFT treats a string `target_modules`, the keys of `rank_pattern` / `alpha_pattern` and
`layers_pattern` as regular expressions. An adapter config is user input, and a pattern such as
`(a|aa)+$` backtracks exponentially: Python's `re` has no way to stop it. These helpers use the
`regex` package (re-compatible syntax) with a per-match timeout and, around the validation of
one adapter (`budget`), one deadline for all its matches together (a config may hold a thousand
patterns, each matched against every module), and cap the pattern's length. Matching releases
the interpreter lock (`concurrent=True`), so other threads keep running meanwhile. A hostile
config costs at most about a second and is refused with a message that names the field.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import regex

MAX_PATTERN_CHARS = 1000
MATCH_TIMEOUT_S = 0.05  # per match; a config is matched against the base model's module names
CONFIG_BUDGET_S = 1.0  # every match made while validating one adapter, together
_deadline = threading.local()


class PatternError(ValueError):
    """A pattern from an adapter config that is invalid or too expensive to match."""


@lru_cache(maxsize=256)
def _compile(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern, flags=regex.VERSION0)


def compile_pattern(pattern: str, field: str) -> regex.Pattern[str]:
    """The compiled pattern, or PatternError naming `field`."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{field}: the pattern is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    try:
        return _compile(pattern)
    except (regex.error, OverflowError, RecursionError, ValueError) as exc:
        raise PatternError(f"{field}: {pattern[:80]!r} is not a valid regular expression ({exc})") from None


@contextmanager
def budget(seconds: float | None = None) -> Iterator[None]:
    """Matches made in this block (on this thread) share one deadline (CONFIG_BUDGET_S unless
    given); nested blocks keep the outer one."""
    outer = getattr(_deadline, "at", None)
    limit = CONFIG_BUDGET_S if seconds is None else seconds
    _deadline.at = time.monotonic() + limit if outer is None else outer
    try:
        yield
    finally:
        _deadline.at = outer


def fullmatch(pattern: str, text: str, field: str) -> regex.Match[str] | None:
    return _run(pattern, text, field, full=True)


def match(pattern: str, text: str, field: str) -> regex.Match[str] | None:
    return _run(pattern, text, field, full=False)


def _run(pattern: str, text: str, field: str, *, full: bool) -> regex.Match[str] | None:
    compiled = compile_pattern(pattern, field)
    timeout = MATCH_TIMEOUT_S
    at = getattr(_deadline, "at", None)
    if at is not None:
        timeout = min(timeout, at - time.monotonic())
        if timeout <= 0:
            raise PatternError(f"{field}: matching the adapter config's patterns against the module names takes "
                               f"more than {CONFIG_BUDGET_S:g} s in all; use fewer or simpler patterns")
    try:
        if full:
            return compiled.fullmatch(text, timeout=timeout, concurrent=True)
        return compiled.match(text, timeout=timeout, concurrent=True)
    except TimeoutError:
        raise PatternError(
            f"{field}: {pattern[:80]!r} takes too long to match module names (more than "
            f"{MATCH_TIMEOUT_S * 1000:.0f} ms on {text!r}); simplify it"
        ) from None
