"""Regular expressions from adapter configs, matched at a bounded cost.

PEFT treats a string `target_modules`, the keys of `rank_pattern` / `alpha_pattern` and
`layers_pattern` as regular expressions. An adapter config is user input, and a pattern such as
`(a|aa)+$` backtracks exponentially: Python's `re` has no way to stop it. These helpers use the
`regex` package (re-compatible syntax) with a per-match timeout, and cap the pattern's length,
so a hostile config costs at most a few hundred milliseconds and is refused with a message that
names the field.
"""

from __future__ import annotations

from functools import lru_cache

import regex

MAX_PATTERN_CHARS = 1000
MATCH_TIMEOUT_S = 0.05  # per match; a config is matched against the base model's module names


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


def fullmatch(pattern: str, text: str, field: str) -> regex.Match[str] | None:
    return _run(pattern, text, field, full=True)


def match(pattern: str, text: str, field: str) -> regex.Match[str] | None:
    return _run(pattern, text, field, full=False)


def _run(pattern: str, text: str, field: str, *, full: bool) -> regex.Match[str] | None:
    compiled = compile_pattern(pattern, field)
    try:
        if full:
            return compiled.fullmatch(text, timeout=MATCH_TIMEOUT_S)
        return compiled.match(text, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise PatternError(
            f"{field}: {pattern[:80]!r} takes too long to match module names (more than "
            f"{MATCH_TIMEOUT_S * 1000:.0f} ms on {text!r}); simplify it"
        ) from None
