"""Structured outputs on the service side: what a request asks for (OpenAI's `response_format`,
vLLM's `structured_outputs` and its older `guided_*` fields), checked and compiled once into a
grammar (xgrammar), cached by its canonical text. The engine applies the grammar's token masks per
row (server/grammar_masks.py), so constrained and free rows share a step.

Limits, each a 400: a specification of at most MAX_SPEC_BYTES, a JSON schema nested at most
MAX_SCHEMA_DEPTH deep, at most MAX_CHOICES choices, and a compile of at most COMPILE_TIMEOUT_S
(compiles run one at a time on a thread of their own; one that overruns is abandoned to finish
there, and its specification is refused from then on without compiling it again). JSON comes
out in one fixed layout (`{"a": 1, "b": [2, 3]}`): free whitespace would let an adapter never
trained for JSON pad forever. No tensors and no HTTP here.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import InvalidRequestError, QueueFullError
from server.grammar_masks import GrammarState, allocate_masks

MAX_SPEC_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_CHOICES = 256
COMPILE_TIMEOUT_S = 10.0  # of compiling, from when the compile thread starts it (queueing excluded)
MAX_PENDING = 16  # distinct formats compiling or queued at once; more are a 429
CACHE_SIZE = 256

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredSpec:
    """One format: its kind and canonical text (a schema or choice list as compact JSON)."""

    kind: Kind
    source: str
    param: str  # the request field it came from (errors name it)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than `limit` + 1."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _schema_spec(schema: Any, param: str) -> StructuredSpec:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("a JSON schema is an object", param=param)
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} deep", param=param)
    # Key order stays: properties come out in the order the schema lists them.
    return StructuredSpec("json_schema", json.dumps(schema, separators=(",", ":")), param)


def _choice_spec(choices: Any, param: str) -> StructuredSpec:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("a choice is a non-empty list of strings", param=param)
    if len(choices) > MAX_CHOICES:
        raise InvalidRequestError(f"at most {MAX_CHOICES} choices", param=param)
    return StructuredSpec("choice", json.dumps(choices), param)


def _text_spec(kind: Kind, value: Any, param: str) -> StructuredSpec:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} is a non-empty string", param=param)
    return StructuredSpec(kind, value, param)


def parse_spec(response_format: dict[str, Any] | None, structured: dict[str, Any] | None,
               guided: dict[str, Any]) -> StructuredSpec | None:
    """The one format a request asks for (None: free text). `response_format`: OpenAI's;
    `structured`: vLLM's `structured_outputs` (json, regex, choice, grammar, json_object);
    `guided`: vLLM's older fields by name (guided_json, ...), those the client set."""
    found: list[StructuredSpec] = []
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            found.append(StructuredSpec("json_object", "", "response_format"))
        elif kind == "json_schema":
            inner = response_format.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner:
                raise InvalidRequestError("response_format json_schema needs json_schema.schema", param="response_format")
            found.append(_schema_spec(inner["schema"], "response_format"))
        elif kind != "text":
            raise InvalidRequestError(f"response_format type {str(kind)[:40]!r} is not one of text, json_object, "
                                      "json_schema", param="response_format")
    fields = {**{f"structured_outputs.{k}": v for k, v in (structured or {}).items()},
              **{k: v for k, v in guided.items()}}
    for name, value in fields.items():
        if value is None or value is False:
            continue
        field = name.rsplit(".", 1)[-1].removeprefix("guided_")
        if field == "json":
            found.append(_schema_spec(value, name))
        elif field == "json_object":
            found.append(StructuredSpec("json_object", "", name))
        elif field == "choice":
            found.append(_choice_spec(value, name))
        elif field in ("regex", "grammar"):
            found.append(_text_spec(field, value, name))  # type: ignore[arg-type]
        else:
            raise InvalidRequestError(f"unknown structured output {name!r} (json, regex, choice, grammar, json_object)",
                                      param=name)
    if len(found) > 1:
        raise InvalidRequestError("a request asks for one output format; this one names "
                                  + ", ".join(s.param for s in found), param=found[1].param)
    if found and len(found[0].source.encode()) > MAX_SPEC_BYTES:
        raise InvalidRequestError(f"the output format is larger than {MAX_SPEC_BYTES // 1024} KiB", param=found[0].param)
    return found[0] if found else None


def _ebnf_literal(text: str) -> str:
    """A string as an EBNF literal (JSON escapes: quotes, backslashes, control characters)."""
    return json.dumps(text, ensure_ascii=False)


def _can_begin(grammar: Any) -> bool:
    """Whether some token can start the format (a fresh matcher's mask is not empty). Formats
    that dead-end later are caught while sampling (the request ends with a 400-type error)."""
    state = GrammarState(grammar, ())
    masks = allocate_masks(1, state.vocab)
    state.fill(masks, 0)
    return bool(masks.any())


COMPILE_ERRORS = (RuntimeError, ValueError, TypeError)  # xgrammar's parse and conversion errors


def _noun(kind: str) -> str:
    return kind.replace("_", " ")


def _unusable(kind: str, exc: BaseException) -> str:
    return f"cannot use this {_noun(kind)}: {_message(exc)}"


def _message(exc: BaseException) -> str:
    """xgrammar's error without its source location prefix ("[12:00:00] /path/file.cc:42: ")."""
    return re.sub(r"^\[[\d:]+\] [^:]*:\d+: ", "", str(exc).strip())[:300]


class StructuredOutputs:
    """Compiles formats for one tokenizer, caching the last CACHE_SIZE."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraswap-grammar-compile")
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pending: dict[tuple[str, str], _Job] = {}  # compiling or queued, at most MAX_PENDING
        # format -> why it gets a 400 (invalid, or too slow to compile), the last CACHE_SIZE
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()

    def _compile_now(self, spec: StructuredSpec) -> Any:
        """On the compile thread."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        compiler = self._compiler
        if spec.kind == "json_schema":
            grammar = compiler.compile_json_schema(spec.source, any_whitespace=False)
        elif spec.kind == "json_object":
            grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        elif spec.kind == "regex":
            grammar = compiler.compile_regex(spec.source)
        elif spec.kind == "choice":
            grammar = compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in json.loads(spec.source)))
        else:
            grammar = compiler.compile_grammar(spec.source)
        if not _can_begin(grammar):
            raise ValueError("no token of this model's vocabulary can begin it")
        return grammar

    def _run(self, spec: StructuredSpec, job: _Job) -> Any:
        """On the compile thread: the time limit counts from here, not from the queue."""
        job.started_at = time.monotonic()
        return self._compile_now(spec)

    def _finished(self, key: tuple[str, str], future: Future[Any]) -> None:
        """On the event loop, once a compile ends (even after its waiters gave up on it): a
        grammar is cached, so a slow but valid format compiles once; an error is remembered."""
        self._pending.pop(key, None)
        exc = future.exception()
        if exc is None:
            self._refused.pop(key, None)
            _remember(self._cache, key, future.result())
        elif isinstance(exc, COMPILE_ERRORS):
            _remember(self._refused, key, _unusable(key[0], exc))

    async def compile(self, spec: StructuredSpec) -> Any:
        """The compiled grammar of `spec` (from the cache when it was compiled before)."""
        key = spec.key
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._refused:
            raise InvalidRequestError(self._refused[key], param=spec.param)
        job = self._pending.get(key)
        if job is None:
            if len(self._pending) >= MAX_PENDING:
                raise QueueFullError(f"{MAX_PENDING} output formats are being compiled; retry later")
            job = self._pending[key] = _Job()
            loop = asyncio.get_running_loop()
            job.future = self._pool.submit(self._run, spec, job)
            job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, key, f))
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():
            started = job.started_at
            left = 0.1 if started is None else started + COMPILE_TIMEOUT_S - time.monotonic()
            if left <= 0:
                why = f"the {_noun(spec.kind)} takes longer than {COMPILE_TIMEOUT_S:g} s to compile; simplify it"
                _remember(self._refused, key, why)
                raise InvalidRequestError(why, param=spec.param)
            await asyncio.wait({waiting}, timeout=left)
        try:
            return waiting.result()
        except COMPILE_ERRORS as exc:
            raise InvalidRequestError(_unusable(spec.kind, exc), param=spec.param) from None


@dataclass
class _Job:
    """A compile submitted to the compile thread: its future, and when it began running there."""

    future: Future[Any] = field(default_factory=Future)
    started_at: float | None = None


def _remember(cache: OrderedDict[tuple[str, str], Any], key: tuple[str, str], value: Any) -> None:
    """Keep `value` under `key`, dropping the least recently added past CACHE_SIZE."""
    cache[key] = value
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
