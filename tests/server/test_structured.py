"""Structured outputs (issue 21 item 3) over HTTP, in process, on the tiny chat Llama (random
weights: a model never trained for JSON) with and without an adapter: JSON schemas, JSON objects,
regexes, choices and grammars, streamed and not, always parse and validate; constrained rows share
a step with free ones, whose tokens do not change; bad or oversized formats are 400s."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

import server.grammar_masks as grammar_masks
import server.structured as structured
from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.errors import InvalidRequestError
from server.structured import MAX_SCHEMA_DEPTH, parse_spec
from tests.adapters.helpers import write_random_adapter
from tests.server.test_api import assert_error, wait_ready

NAME = {"type": "string", "maxLength": 8}
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": NAME, "maxItems": 3}},
     "required": ["ok", "tags"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "number"}},
     "required": ["color"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                                 "y": {"type": "integer"}},
                                                "required": ["x", "y"]},
                                      "label": {"anyOf": [NAME, {"type": "null"}]}},
     "required": ["point", "label"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}, "required": ["id"]},
]


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("structured")
    write_random_adapter(root / "a", tiny_llama_dir, rank=4, targets=["q_proj", "v_proj", "up_proj"], seed=9)
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=4, max_model_len=256, max_loras=1, max_lora_rank=8,
                    lora_modules={"a": str(root / "a")})
    app = create_app(lambda metrics: build_service(conf, metrics))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def complete(client: TestClient, stream: bool = False, **body: Any) -> str:
    body = {"prompt": "Give me data:", "max_tokens": 120, "temperature": 1.0, **body}
    if not stream:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        return str(choice["text"])
    parts = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                parts += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(parts)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", [None, "a"], ids=["base", "adapter"])
def test_json_schema_outputs_validate(client: TestClient, model: str | None, stream: bool) -> None:
    for i, schema in enumerate(SCHEMAS):
        for seed in range(2):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
            text = complete(client, stream, response_format=fmt, seed=seed, **({"model": model} if model else {}))
            jsonschema.validate(json.loads(text), schema)


def test_every_way_of_asking(client: TestClient) -> None:
    schema = SCHEMAS[0]
    for body in ({"structured_outputs": {"json": schema}}, {"guided_json": schema}, {"guided_json": json.dumps(schema)}):
        jsonschema.validate(json.loads(complete(client, seed=3, **body)), schema)
    # Any object: its strings end only when the model closes them, which a random model does once
    # in 50k tokens; a bias on the closing quote makes it likely (the grammar decides where it may go).
    quote = {str(client.app.state.holder.service.tokenizer.convert_tokens_to_ids('"')): 12}  # type: ignore[attr-defined]
    for seed in range(3):
        for body in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json_object": True}}):
            assert isinstance(json.loads(complete(client, seed=seed, logit_bias=quote, **body)), dict)
    for body in ({"structured_outputs": {"regex": r"[a-z]{2,5}-\d{3}"}}, {"guided_regex": r"[a-z]{2,5}-\d{3}"}):
        assert re.fullmatch(r"[a-z]{2,5}-\d{3}", complete(client, seed=1, **body))
    choices = ["yes", "no", 'it\'s "fine"\n']
    for body in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        assert complete(client, seed=2, **body) in choices
    grammar = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    for body in ({"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        assert re.fullmatch(r"\([1-9]\d?(,[1-9]\d?)*\)", complete(client, seed=4, **body))
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "data?"}], "max_tokens": 120, "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[1]}}})
    assert chat.status_code == 200, chat.text
    jsonschema.validate(json.loads(chat.json()["choices"][0]["message"]["content"]), SCHEMAS[1])
    free = client.post("/v1/completions", json={"prompt": "x", "seed": 1, "response_format": {"type": "text"},
                                                "max_tokens": 5, "ignore_eos": True})
    assert free.status_code == 200 and free.json()["usage"]["completion_tokens"] == 5  # text: no format


def test_constrained_and_free_rows_share_a_step(client: TestClient) -> None:
    free = {"prompt": [1, 520, 33, 4000, 77], "max_tokens": 24, "temperature": 0.8, "seed": 11, "ignore_eos": True}
    alone = client.post("/v1/completions", json=free).json()["choices"][0]["text"]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}
    with ThreadPoolExecutor(4) as pool:
        constrained = [pool.submit(complete, client, response_format=fmt, seed=s, model="a" if s % 2 else None)
                       for s in range(3)]
        shared = pool.submit(client.post, "/v1/completions", json=free)
        assert shared.result().json()["choices"][0]["text"] == alone
        for future in constrained:
            jsonschema.validate(json.loads(future.result()), SCHEMAS[0])


def test_grammars_are_compiled_once(client: TestClient) -> None:
    service = client.app.state.holder.service  # type: ignore[attr-defined]
    schema = {"type": "object", "properties": {"once": {"type": "integer"}}, "required": ["once"]}
    complete(client, response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
    cached = dict(service.structured._cache)
    complete(client, structured_outputs={"json": schema}, seed=1)  # the same schema, asked another way
    assert service.structured._cache.keys() == cached.keys()
    assert all(service.structured._cache[k] is v for k, v in cached.items())


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


BAD = [
    ("two-formats", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("format-and-response-format", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ("bad-type", {"response_format": {"type": "xml"}}, "response_format"),
    ("schema-missing", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("schema-invalid", {"guided_json": {"type": "objectx"}}, "guided_json"),
    ("schema-not-json", {"guided_json": "{nope"}, "guided_json"),
    ("schema-too-deep", {"guided_json": nested(MAX_SCHEMA_DEPTH)}, "guided_json"),
    ("schema-too-large", {"guided_json": {"enum": ["x" * 1000] * 70}}, "guided_json"),
    ("regex-invalid", {"guided_regex": "(ab"}, "guided_regex"),
    ("regex-empty", {"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ("grammar-invalid", {"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ("choice-empty", {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ("choice-not-strings", {"structured_outputs": {"choice": [1, 2]}}, "structured_outputs.choice"),
    ("unknown-kind", {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ("ignore-eos", {"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_formats_are_400s(client: TestClient, body: dict[str, Any], param: str) -> None:
    assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, **body}), 400, param=param)


def test_a_slow_compile_is_refused_and_not_retried(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    service = client.app.state.holder.service  # type: ignore[attr-defined]
    real = service.structured._compile_now
    calls = []

    def slow(spec: Any) -> Any:
        calls.append(spec)
        time.sleep(1.0)
        return real(spec)

    monkeypatch.setattr(structured, "COMPILE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(service.structured, "_compile_now", slow)
    body = {"prompt": "x", "max_tokens": 4, "guided_regex": "slow[0-9]"}
    for _ in range(2):
        error = assert_error(client.post("/v1/completions", json=body), 400, param="guided_regex")
        assert "longer than 0.2 s" in error["message"]
    assert len(calls) == 1
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200  # still serving
    # The compile that outlived its waiters is kept once it ends: a valid format is not refused forever.
    deadline = time.monotonic() + 30
    while client.post("/v1/completions", json=body).status_code != 200:
        assert time.monotonic() < deadline, "the finished compile was never cached"
        time.sleep(0.2)
    assert len(calls) == 1


def test_compile_time_limit_counts_from_the_start_not_the_queue(client: TestClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A format queued behind a slow one is not refused for the wait; past MAX_PENDING queued
    formats a request is a 429, and the server keeps serving."""
    service = client.app.state.holder.service  # type: ignore[attr-defined]
    real = service.structured._compile_now

    def slow_first(spec: Any) -> Any:
        if spec.source == "queue-head[0-9]":
            time.sleep(1.5)
        return real(spec)

    monkeypatch.setattr(structured, "COMPILE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(structured, "MAX_PENDING", 2)
    monkeypatch.setattr(service.structured, "_compile_now", slow_first)
    with ThreadPoolExecutor(3) as pool:
        head = pool.submit(client.post, "/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                                                 "guided_regex": "queue-head[0-9]"})
        time.sleep(0.3)  # the slow one is compiling
        queued = pool.submit(client.post, "/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                                                   "guided_regex": "queued[0-9]"})
        time.sleep(0.3)
        third = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "guided_regex": "third[0-9]"})
        assert_error(third, 429)
        assert "longer than 1 s" in assert_error(head.result(), 400)["message"]
        assert queued.result().status_code == 200, queued.result().text  # waited ~1.2 s in the queue


def test_a_format_too_costly_to_follow_ends_only_its_request(client: TestClient,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks slower than SLOW_FILL_S on SLOW_FILLS steps in a row end that request with a 400-type
    error (here every mask counts as slow); a free request in the same batch is untouched."""
    free = {"prompt": "Once", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = client.post("/v1/completions", json=free).json()["choices"][0]["text"]
    monkeypatch.setattr(grammar_masks, "SLOW_FILL_S", 0.0)
    # 48 letters: more tokens than SLOW_FILLS whatever the model picks, nothing may end it sooner
    body = {"prompt": "x", "max_tokens": 60, "temperature": 0, "guided_regex": "(a|b){48}"}
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.post, "/v1/completions", json=body)
        other = pool.submit(client.post, "/v1/completions", json=free)
        message = assert_error(slow.result(), 400)["message"]
        assert "costs too much to follow" in message
        assert other.result().json()["choices"][0]["text"] == expected


def test_a_failing_matcher_allows_nothing_in_its_own_row_only(tiny_llama_dir: Path) -> None:
    """A matcher that raises while filling its mask allows nothing in its own row (which the
    sampler then refuses, like any row with no allowed token); the next row's mask is the real one."""
    from transformers import AutoTokenizer

    outputs = structured.StructuredOutputs(AutoTokenizer.from_pretrained(tiny_llama_dir), 49152)
    grammar = asyncio.run(outputs.compile(parse_spec(None, None, {"guided_regex": "[a-c]+"})))
    broken, fine = grammar_masks.GrammarState(grammar, ()), grammar_masks.GrammarState(grammar, ())

    class Raising:
        def fill_next_token_bitmask(self, masks: Any, index: int) -> None:
            raise RuntimeError("matcher gone")

    broken.matcher = Raising()
    masks = grammar_masks.allocate_masks(2, fine.vocab)
    masks.fill_(-1)
    broken.fill(masks, 0)
    fine.fill(masks, 1)
    assert not masks[0].any() and masks[1].any()


def test_parse_spec_canonical_keys() -> None:
    a = parse_spec({"type": "json_schema", "json_schema": {"schema": {"b": 1, "a": 2}}}, None, {})
    b = parse_spec(None, {"json": '{"b": 1,\n "a": 2}'}, {})
    assert a is not None and b is not None and a.key == b.key
    assert parse_spec({"type": "text"}, None, {"guided_json": None}) is None
    with pytest.raises(InvalidRequestError):
        parse_spec(None, None, {"guided_json": 5})


def test_a_format_that_dead_ends_is_the_clients_error(client: TestClient) -> None:
    """A private-use character no token of this vocabulary spells (byte tokens only reach it in
    part): the request ends with a 400-type error, streamed or not, and the server keeps serving."""
    body = {"prompt": "x", "max_tokens": 20, "guided_regex": "ab\U0009a438"}
    error = assert_error(client.post("/v1/completions", json=body), 400)
    assert "can continue the requested output format" in error["message"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "invalid_request_error"
    begin = client.post("/v1/completions", json={**body, "guided_regex": "\U0009a438"})  # refused before it runs
    assert "can begin" in assert_error(begin, 400, param="guided_regex")["message"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
