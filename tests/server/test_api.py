"""The HTTP API in process (FastAPI TestClient) over a tiny random-weight Llama.

The tiny model talks nonsense, but greedy decoding is deterministic, so the tests compare the API
with itself: streaming against non-streaming, token-id prompts against text prompts, seeded runs
against each other, stop strings against an unstopped run of the same request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.errors import QueueFullError
from server.service import CompletionService
from tests.server.families import CHAT_VOCAB

MAX_MODEL_LEN = 128
TINY_VOCAB = CHAT_VOCAB  # the SmolLM2 tokenizer of the tiny model
READY_TIMEOUT_S = 120.0
SERVED_NAME = "tiny-llama"  # the model folder's name (tests/conftest.py)
PROMPT = "Hello, my name is"
CHAT = [{"role": "user", "content": "Hi there, who are you?"}]

Json = dict[str, Any]


# ---- helpers ---------------------------------------------------------------------------------


def wait_ready(client: TestClient, timeout_s: float = READY_TIMEOUT_S) -> Json:
    """Poll GET /ready until 200; fail with the last answer if it does not come in time."""
    deadline = time.monotonic() + timeout_s
    last: Json = {}
    while time.monotonic() < deadline:
        response = client.get("/ready")
        last = response.json()
        if response.status_code == 200:
            return last
        assert response.status_code == 503, response.text
        if last.get("status") == "failed":
            pytest.fail(f"the model failed to load: {last}")
        time.sleep(0.05)
    pytest.fail(f"GET /ready not 200 after {timeout_s} s; last answer: {last}")


def wait_idle(client: TestClient, timeout_s: float = 10.0) -> Json:
    """Poll GET /ready until no request runs or waits (e.g. after a timeout or a cancel, which
    the engine handles between steps); returns that answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = client.get("/ready").json()
        if ready["running"] == 0 and ready["waiting"] == 0:
            return ready
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still running: {ready}")
        time.sleep(0.05)


def assert_error(response: Response, status: int, *, param: str | None = None, code: str | int | None = None) -> Json:
    """The response has `status` and exactly OpenAI's error body; returns the inner error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(response: Response) -> list[Json]:
    """Parse an SSE body: every event is one `data: ...` line; the last one is `[DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n"), response.text[-200:]
    events = response.text.split("\n\n")[:-1]
    assert events, "empty stream"
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
    payloads = [event[len("data: "):] for event in events]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def split_stream(chunks: list[Json]) -> tuple[list[Json], Json | None]:
    """(chunks with choices, the usage chunk if any); a usage chunk must be the last one."""
    with_choices = [c for c in chunks if c["choices"]]
    usage_chunks = [c for c in chunks if not c["choices"]]
    assert len(usage_chunks) <= 1, usage_chunks
    if usage_chunks:
        assert chunks[-1] is usage_chunks[0], "the usage chunk is not the last one"
        assert usage_chunks[0]["usage"] is not None
    for chunk in with_choices:
        assert chunk.get("usage") is None, chunk
    return with_choices, (usage_chunks[0] if usage_chunks else None)


def texts_by_index(chunks: list[Json], n_choices: int, *, chat: bool) -> tuple[list[str], list[str]]:
    """Concatenated text and the finish reason of every choice; one finishing chunk per choice,
    and it is that choice's last chunk."""
    texts = [""] * n_choices
    finishes: list[list[str]] = [[] for _ in range(n_choices)]
    for chunk in chunks:
        assert len(chunk["choices"]) == 1, chunk
        choice = chunk["choices"][0]
        index = choice["index"]
        assert 0 <= index < n_choices, chunk
        assert not finishes[index], f"choice {index} has a chunk after its finishing chunk: {chunk}"
        if chat:
            texts[index] += choice["delta"].get("content") or ""
        else:
            texts[index] += choice["text"]
        if choice["finish_reason"] is not None:
            finishes[index].append(choice["finish_reason"])
    for index, reasons in enumerate(finishes):
        assert len(reasons) == 1, f"choice {index} finished {len(reasons)} times"
    return texts, [reasons[0] for reasons in finishes]


def single_completion(client: TestClient, request: Json) -> tuple[list[str], list[str]]:
    """([text], [finish_reason]) of a one-choice completion, streamed or not as `request` says."""
    response = client.post("/v1/completions", json=request)
    if request.get("stream"):
        return texts_by_index(split_stream(sse_events(response))[0], 1, chat=False)
    choice = response.json()["choices"][0]
    return [choice["text"]], [choice["finish_reason"]]


def complete(client: TestClient, **body: Any) -> Json:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def chat(client: TestClient, **body: Any) -> Json:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(**extra: Any) -> Json:
    return {"temperature": 0, "ignore_eos": True, **extra}


# ---- fixtures --------------------------------------------------------------------------------


def tiny_settings(folder: Path) -> Settings:
    return Settings(model=str(folder), max_num_seqs=4, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path) -> Iterator[TestClient]:
    settings = tiny_settings(tiny_llama_dir)
    app = create_app(lambda metrics: build_service(settings, metrics))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def service(client: TestClient) -> CompletionService:
    svc = client.app.state.holder.service  # type: ignore[attr-defined]
    assert svc is not None
    return svc


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


# ---- health and readiness --------------------------------------------------------------------


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["model"] == SERVED_NAME
    assert body["running"] == 0 and body["waiting"] == 0
    kv = body["kv_cache"]
    assert kv["block_size"] == 16 and kv["blocks_total"] == 4 * MAX_MODEL_LEN // 16 and kv["blocks_used"] == 0


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client: TestClient) -> None:
    prompt = " ".join(f"w{i}" for i in range(24))  # 60-odd tokens: over two 32-token chunks
    before = client.get("/ready").json()["kv_cache"]["prefix_cache_hits"].get(SERVED_NAME, 0)
    answers = [client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
               for _ in range(2)]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
    kv = wait_idle(client)["kv_cache"]  # /ready reports as of the engine's last step
    assert kv["prefix_cache_hits"][SERVED_NAME] - before >= 32 and kv["blocks_used"] == 0
    metrics = client.get("/metrics").text
    assert f'loraswap_prefix_cache_hits_total{{model="{SERVED_NAME}"}}' in metrics


INFERENCE_CALLS: list[tuple[str, str, Json | None]] = [
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
    ("GET", "/v1/models", None),
]


def test_not_ready_while_loading() -> None:
    started = threading.Event()
    release = threading.Event()

    def blocking_factory(_metrics: object) -> CompletionService:
        started.set()
        release.wait(60)
        raise RuntimeError("released by the test")

    app = create_app(blocking_factory)
    try:
        with TestClient(app) as test_client:
            assert started.wait(10), "the factory never ran"
            for _ in range(2):  # twice: answers must not change while the factory is blocked
                response = test_client.get("/ready")
                assert response.status_code == 503
                assert response.json() == {"status": "loading"}
                health = test_client.get("/health")
                assert health.status_code == 200 and health.json() == {"status": "ok"}
                for method, path, body in INFERENCE_CALLS:
                    response = test_client.request(method, path, json=body)
                    assert_error(response, 503, code="model_loading")
                    assert response.json()["error"]["type"] == "service_unavailable"
                    assert response.headers.get("retry-after") == "5"
            release.set()
            app.state.holder.join(10)
    finally:
        release.set()


def test_ready_reports_a_failed_load() -> None:
    failures: list[str] = []

    def failing_factory(_metrics: object) -> CompletionService:
        raise RuntimeError("weights are corrupt")

    app = create_app(failing_factory, on_load_failure=failures.append)
    with TestClient(app) as test_client:
        app.state.holder.join(10)
        response = test_client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "failed"
        assert "weights are corrupt" in body["error"]
        assert failures == ["RuntimeError: weights are corrupt"]
        assert test_client.get("/health").status_code == 200
        for method, path, payload in INFERENCE_CALLS:
            response = test_client.request(method, path, json=payload)
            assert_error(response, 503, code="model_load_failed")
            assert "retry-after" not in response.headers  # retrying will not help


def test_inference_after_a_failed_load_says_it_failed() -> None:
    def failing_factory(_metrics: object) -> CompletionService:
        raise RuntimeError("weights are corrupt")

    app = create_app(failing_factory)
    with TestClient(app) as test_client:
        app.state.holder.join(10)
        error = assert_error(test_client.post("/v1/completions", json={"prompt": "hi"}), 503, code="model_load_failed")
        assert "weights are corrupt" in error["message"]


# ---- models ----------------------------------------------------------------------------------


def test_models_lists_the_served_name(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [SERVED_NAME]
    card = body["data"][0]
    assert card["object"] == "model"
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert isinstance(card["created"], int)


# ---- completions -----------------------------------------------------------------------------


def test_completion_length_and_usage(client: TestClient, tokenizer: Any) -> None:
    body = complete(client, model=SERVED_NAME, prompt=PROMPT, max_tokens=5, **greedy())
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == SERVED_NAME
    assert isinstance(body["created"], int)
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str)
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }


def test_model_field_may_be_omitted(client: TestClient) -> None:
    with_name = complete(client, model=SERVED_NAME, prompt=PROMPT, max_tokens=4, **greedy())
    without = complete(client, prompt=PROMPT, max_tokens=4, **greedy())
    assert without["model"] == SERVED_NAME
    assert without["choices"][0]["text"] == with_name["choices"][0]["text"]


def test_greedy_is_deterministic(client: TestClient) -> None:
    runs = [complete(client, prompt=PROMPT, max_tokens=8, **greedy()) for _ in range(2)]
    assert runs[0]["choices"][0]["text"] == runs[1]["choices"][0]["text"]
    assert runs[0]["choices"][0]["text"] != ""


def test_list_prompts_and_n(client: TestClient, tokenizer: Any) -> None:
    prompts = ["Once upon a time", "The weather today", "1, 2, 3,"]
    n = 2
    body = complete(client, prompt=prompts, n=n, max_tokens=3, echo=True, **greedy())
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(len(prompts) * n))
    for i, choice in enumerate(choices):
        # Prompt-major order: choices i*n .. i*n+n-1 belong to prompt i (echo shows which).
        assert choice["text"].startswith(prompts[i // n]), (i, choice["text"])
        assert choice["finish_reason"] == "length"
    # Greedy samples of one prompt agree.
    for i in range(len(prompts)):
        assert choices[i * n]["text"] == choices[i * n + 1]["text"]
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in prompts)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3 * len(prompts) * n,
        "total_tokens": prompt_tokens + 3 * len(prompts) * n,
    }


def test_echo_prepends_the_prompt(client: TestClient) -> None:
    plain = complete(client, prompt=PROMPT, max_tokens=4, **greedy())
    echoed = complete(client, prompt=PROMPT, max_tokens=4, echo=True, **greedy())
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]


def test_token_id_prompts(client: TestClient, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)
    by_text = complete(client, prompt=PROMPT, max_tokens=6, **greedy())
    by_ids = complete(client, prompt=ids, max_tokens=6, **greedy())
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)

    batch = [ids, [5, 6, 7, 8, 9]]
    body = complete(client, prompt=batch, max_tokens=2, **greedy())
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == complete(client, prompt=ids, max_tokens=2, **greedy())["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(ids) + 5
    assert body["usage"]["completion_tokens"] == 4


def test_default_max_tokens_is_16(client: TestClient) -> None:
    body = complete(client, prompt=PROMPT, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"


def test_null_max_tokens_fills_the_context(client: TestClient, tokenizer: Any) -> None:
    body = complete(client, prompt=PROMPT, max_tokens=None, **greedy())
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(tokenizer.encode(PROMPT))
    assert body["choices"][0]["finish_reason"] == "length"


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    body = complete(client, prompt=PROMPT, max_tokens=2, suffix_from_a_newer_client=True, **greedy())
    assert body["usage"]["completion_tokens"] == 2


# ---- streaming completions -------------------------------------------------------------------


def test_streaming_completion_matches_non_streaming(client: TestClient) -> None:
    request = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, **greedy())
    reference = complete(client, **request)
    response = client.post("/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers.get("cache-control") == "no-cache"
    chunks = sse_events(response)
    with_choices, usage_chunk = split_stream(chunks)
    assert with_choices, "no text chunks"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == SERVED_NAME
        assert isinstance(chunk["created"], int)
    texts, finishes = texts_by_index(with_choices, 1, chat=False)
    assert texts == [reference["choices"][0]["text"]]
    assert finishes == ["length"]
    assert usage_chunk is not None
    assert usage_chunk["usage"] == reference["usage"]


def test_streaming_is_the_default_usage_and_can_be_turned_off(client: TestClient) -> None:
    request = dict(prompt=PROMPT, max_tokens=4, stream=True, **greedy())
    default_chunks = sse_events(client.post("/v1/completions", json=request))
    assert split_stream(default_chunks)[1] is not None  # usage included unless turned off
    chunks = sse_events(
        client.post("/v1/completions", json={**request, "stream_options": {"include_usage": False}})
    )
    with_choices, usage_chunk = split_stream(chunks)
    assert usage_chunk is None
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    texts, finishes = texts_by_index(with_choices, 1, chat=False)
    assert finishes == ["length"]
    assert texts == [complete(client, prompt=PROMPT, max_tokens=4, **greedy())["choices"][0]["text"]]


def test_streaming_several_choices(client: TestClient) -> None:
    prompts = ["Once upon a time", "The weather today"]
    request = dict(prompt=prompts, n=2, max_tokens=5, **greedy())
    reference = complete(client, **request)
    chunks = sse_events(client.post("/v1/completions", json={**request, "stream": True}))
    with_choices, usage_chunk = split_stream(chunks)
    texts, finishes = texts_by_index(with_choices, 4, chat=False)
    assert texts == [c["text"] for c in reference["choices"]]
    assert finishes == ["length"] * 4
    assert usage_chunk is not None and usage_chunk["usage"] == reference["usage"]


def test_streaming_echo_opens_with_the_prompt(client: TestClient) -> None:
    chunks = sse_events(client.post(
        "/v1/completions", json=dict(prompt=PROMPT, max_tokens=3, echo=True, stream=True, **greedy())
    ))
    with_choices, _ = split_stream(chunks)
    assert with_choices[0]["choices"][0]["text"] == PROMPT
    texts, _ = texts_by_index(with_choices, 1, chat=False)
    assert texts == [complete(client, prompt=PROMPT, max_tokens=3, echo=True, **greedy())["choices"][0]["text"]]


# ---- chat ------------------------------------------------------------------------------------


def chat_prompt_tokens(tokenizer: Any, messages: list[Json]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_completion(client: TestClient, tokenizer: Any) -> None:
    body = chat(client, model=SERVED_NAME, messages=CHAT, max_tokens=6, **greedy())
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == SERVED_NAME
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    prompt_tokens = chat_prompt_tokens(tokenizer, CHAT)
    assert prompt_tokens > len(tokenizer.encode(CHAT[0]["content"]))  # the template was applied
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


def test_chat_content_parts_equal_plain_text(client: TestClient) -> None:
    plain = chat(client, messages=CHAT, max_tokens=5, **greedy())
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there, "}, {"type": "text", "text": "who are you?"}]}]
    as_parts = chat(client, messages=parts, max_tokens=5, **greedy())
    assert as_parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert as_parts["usage"] == plain["usage"]


def test_chat_max_completion_tokens(client: TestClient) -> None:
    body = chat(client, messages=CHAT, max_completion_tokens=3, max_tokens=9, **greedy())
    assert body["usage"]["completion_tokens"] == 3


def test_chat_streaming(client: TestClient) -> None:
    request = dict(model=SERVED_NAME, messages=CHAT, max_tokens=8, **greedy())
    reference = chat(client, **request)
    chunks = sse_events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    with_choices, usage_chunk = split_stream(chunks)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == SERVED_NAME
    first = with_choices[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None
    assert all(c["choices"][0]["delta"].get("role") in (None, "assistant") for c in with_choices)
    texts, finishes = texts_by_index(with_choices, 1, chat=True)
    assert texts == [reference["choices"][0]["message"]["content"]]
    assert finishes == ["length"]
    assert usage_chunk is not None and usage_chunk["usage"] == reference["usage"]


def test_chat_streaming_n2_opens_every_choice_with_the_role(client: TestClient) -> None:
    chunks = sse_events(client.post(
        "/v1/chat/completions",
        json=dict(messages=CHAT, max_tokens=3, n=2, stream=True, stream_options={"include_usage": False}, **greedy()),
    ))
    with_choices, usage_chunk = split_stream(chunks)
    assert usage_chunk is None
    openers = {c["choices"][0]["index"]: c["choices"][0]["delta"] for c in reversed(with_choices)}
    assert {i: d["role"] for i, d in openers.items()} == {0: "assistant", 1: "assistant"}
    texts, finishes = texts_by_index(with_choices, 2, chat=True)
    assert finishes == ["length", "length"]
    assert texts[0] == texts[1]


# ---- sampling --------------------------------------------------------------------------------


def sampled(client: TestClient, seed: int, **extra: Any) -> list[str]:
    body = complete(client, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True, **extra)
    return [c["text"] for c in body["choices"]]


def test_same_seed_same_text(client: TestClient) -> None:
    first = sampled(client, 1234)
    assert first == sampled(client, 1234)
    assert first[0] != ""


def test_different_seeds_differ(client: TestClient) -> None:
    outputs = {sampled(client, seed)[0] for seed in (1, 2, 3)}
    assert len(outputs) >= 2, outputs


def test_seeded_samples_of_one_request_use_consecutive_seeds(client: TestClient) -> None:
    both = sampled(client, 77, n=2)
    assert both[0] != both[1]
    assert both == [sampled(client, 77)[0], sampled(client, 78)[0]]


def test_top_k_1_is_greedy(client: TestClient) -> None:
    greedy_text = complete(client, prompt=PROMPT, max_tokens=12, **greedy())["choices"][0]["text"]
    assert sampled(client, 5, top_k=1) == [greedy_text]
    assert sampled(client, 6, top_p=1e-6) == [greedy_text]


# ---- stop strings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unstopped(client: TestClient) -> str:
    text = complete(client, prompt=PROMPT, max_tokens=24, **greedy())["choices"][0]["text"]
    assert len(text) >= 6, f"greedy output too short to pick a stop string from: {text!r}"
    return text


def pick_stop(text: str) -> tuple[str, str]:
    """A 2-character stop string from the middle of `text` and the text expected before it."""
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    return stop, text[: text.find(stop)]


def test_stop_string(client: TestClient, unstopped: str) -> None:
    stop, expected = pick_stop(unstopped)
    body = complete(client, prompt=PROMPT, max_tokens=24, stop=stop, **greedy())
    choice = body["choices"][0]
    assert stop not in choice["text"]
    assert choice["text"] == expected
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] <= 24


def test_stop_string_list_earliest_wins(client: TestClient, unstopped: str) -> None:
    late = unstopped[-2:]
    stop, expected = pick_stop(unstopped)
    if unstopped.find(late) < unstopped.find(stop):  # keep `stop` the earliest of the two
        stop, late = late, stop
        expected = unstopped[: unstopped.find(stop)]
    body = complete(client, prompt=PROMPT, max_tokens=24, stop=[late, stop], **greedy())
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stop_string_streaming(client: TestClient, unstopped: str) -> None:
    stop, expected = pick_stop(unstopped)
    chunks = sse_events(client.post(
        "/v1/completions", json=dict(prompt=PROMPT, max_tokens=24, stop=[stop], stream=True, **greedy())
    ))
    with_choices, _ = split_stream(chunks)
    texts, finishes = texts_by_index(with_choices, 1, chat=False)
    assert texts == [expected]
    assert finishes == ["stop"]
    assert all(stop not in c["choices"][0]["text"] for c in with_choices)


def test_stop_string_across_a_token_boundary(client: TestClient) -> None:
    """A stop string made of the end of one token and the start of the next one."""
    three = complete(client, prompt=PROMPT, max_tokens=3, **greedy())["choices"][0]["text"]
    four = complete(client, prompt=PROMPT, max_tokens=4, **greedy())["choices"][0]["text"]
    assert four.startswith(three) and len(three) >= 2 and len(four) >= len(three) + 2, (three, four)
    stop = four[len(three) - 2 : len(three) + 2]
    expected = four[: four.find(stop)]
    for stream in (False, True):
        request = dict(prompt=PROMPT, max_tokens=8, stop=[stop], stream=stream, **greedy())
        texts, finishes = single_completion(client, request)
        assert texts == [expected], (stream, stop)
        assert finishes == ["stop"]


def test_partial_stop_string_is_released_at_the_end(client: TestClient, unstopped: str) -> None:
    """Text held back because it might start a stop string is sent once the request ends."""
    stop = unstopped[-2:] + "\u2603"  # its first two characters end the output; it never completes
    for stream in (False, True):
        request = dict(prompt=PROMPT, max_tokens=24, stop=stop, stream=stream, **greedy())
        texts, finishes = single_completion(client, request)
        assert texts == [unstopped], stream
        assert finishes == ["length"]


def test_stop_string_that_never_appears(client: TestClient, unstopped: str) -> None:
    body = complete(client, prompt=PROMPT, max_tokens=24, stop=["\u2603never\u2603"], **greedy())
    assert body["choices"][0]["text"] == unstopped
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_token_ids(client: TestClient) -> None:
    """With every id a stop token, the first sampled token ends the request, and adds no text."""
    body = complete(client, prompt=PROMPT, max_tokens=8, stop_token_ids=list(range(TINY_VOCAB)), **greedy())
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == ""
    assert body["usage"]["completion_tokens"] == 1
    # An empty list changes nothing.
    plain = complete(client, prompt=PROMPT, max_tokens=8, stop_token_ids=[], **greedy())
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 8


# ---- errors ----------------------------------------------------------------------------------

LONG_IDS = [100] * (MAX_MODEL_LEN + 10)

ERROR_CASES: list[tuple[str, str, Json, int, str | None]] = [
    # (id, route, body, status, param)
    ("unknown-model", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG_IDS, "max_tokens": 1}, 400, "prompt"),
    ("prompt-text-too-long", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    ("prompt-fills-context", "/v1/completions", {"prompt": [100] * MAX_MODEL_LEN, "max_tokens": 1}, 400, "prompt"),
    ("max-tokens-too-large", "/v1/completions", {"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("max-tokens-too-large-stream", "/v1/completions", {"prompt": "hi", "max_tokens": 1000, "stream": True}, 400, "max_tokens"),
    ("max-tokens-too-large-chat", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000}, 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-in-list", "/v1/completions", {"prompt": ["hi", ""]}, 400, "prompt"),
    ("empty-token-list-in-batch", "/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("token-id-too-large", "/v1/completions", {"prompt": [1, 2, TINY_VOCAB]}, 400, "prompt"),
    ("token-id-negative", "/v1/completions", {"prompt": [1, -1]}, 400, "prompt"),
    ("prompt-wrong-type", "/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("temperature-5", "/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("temperature-negative", "/v1/chat/completions", {"messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ("top-p-0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("presence-penalty-range", "/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency-penalty-chat", "/v1/chat/completions", {"messages": CHAT, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("repetition-penalty-zero", "/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("min-p-range", "/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ("logit-bias-key", "/v1/completions", {"prompt": "hi", "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ("logit-bias-superscript", "/v1/completions", {"prompt": "hi", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    ("logit-bias-value", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit-bias-vocab", "/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("min-tokens-past-max", "/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ("logprobs-21", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("logprobs-negative", "/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("top-logprobs-21", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top-logprobs-alone", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("prompt-logprobs-21", "/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("prompt-logprobs-stream", "/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "stream"),
    ("max-tokens-0-no-echo", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("n-zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("empty-stop-string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("too-many-stop-strings", "/v1/completions", {"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("stop-token-id-out-of-range", "/v1/completions", {"prompt": "hi", "stop_token_ids": [TINY_VOCAB]}, 400, "stop_token_ids"),
    ("seed-negative", "/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error(client: TestClient, route: str, body: Json, status: int, param: str | None) -> None:
    error = assert_error(client.post(route, json=body), status, param=param)
    if status == 404:
        assert error["code"] == "model_not_found"
        assert error["type"] == "invalid_request_error"
        assert "nope" in error["message"]
    else:
        assert error["type"] == "invalid_request_error"


def test_context_boundary(client: TestClient) -> None:
    prompt = [100 + i for i in range(MAX_MODEL_LEN - 8)]
    body = complete(client, prompt=prompt, max_tokens=8, **greedy())
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"
    assert_error(client.post("/v1/completions", json=dict(prompt=prompt, max_tokens=9)), 400, param="max_tokens")


def test_context_error_names_the_limit(client: TestClient) -> None:
    error = assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1000}), 400)
    assert str(MAX_MODEL_LEN) in error["message"]


def test_empty_prompt_list_is_rejected(client: TestClient) -> None:
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, param="prompt")


def test_malformed_json(client: TestClient) -> None:
    for route in ("/v1/completions", "/v1/chat/completions"):
        response = client.post(route, content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
        error = assert_error(response, 400)
        assert error["type"] == "invalid_request_error"


def test_malformed_json_has_no_param(client: TestClient) -> None:
    response = client.post("/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert assert_error(response, 400)["param"] is None


def test_unknown_route(client: TestClient) -> None:
    error = assert_error(client.get("/v1/does-not-exist"), 404)
    assert error["type"] == "not_found_error"
    assert error["code"] == 404


def test_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/completions"), 405)


def test_still_serving_after_errors(client: TestClient, service: CompletionService) -> None:
    # Runs after the error tests (file order): nothing leaked, and requests still succeed.
    body = complete(client, prompt=PROMPT, max_tokens=3, **greedy())
    assert body["usage"]["completion_tokens"] == 3
    assert chat(client, messages=CHAT, max_tokens=2, **greedy())["usage"]["completion_tokens"] == 2
    ready = wait_idle(client)  # /ready reports as of the engine's last step
    assert {k: ready[k] for k in ("status", "model", "running", "waiting")} == {"status": "ready", "model": SERVED_NAME, "running": 0, "waiting": 0}
    assert ready["slots"]["references"] == [0] * len(ready["slots"]["references"])
    stats = service.engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_concurrent_requests(client: TestClient) -> None:
    """More requests than rows (4) at once: all finish, and greedy results match sequential ones."""
    prompts = [f"Request number {i} says" for i in range(6)]
    expected = [complete(client, prompt=p, max_tokens=5, **greedy())["choices"][0]["text"] for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = complete(client, prompt=prompts[i], max_tokens=5, **greedy())["choices"][0]["text"]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert [results.get(i) for i in range(len(prompts))] == expected



@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_before_any_stream_starts(client: TestClient, service: CompletionService, stream: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> None:
        raise QueueFullError("256 requests are already waiting; retry shortly")

    monkeypatch.setattr(service.engine, "submit", full)
    for path, payload in (("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 2}),
                          ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})):
        response = client.post(path, json={**payload, "stream": stream})
        assert_error(response, 429, code="queue_full")
        assert response.headers["retry-after"] == "1"


def test_bad_words_are_never_generated(client: TestClient, service: CompletionService) -> None:
    body = greedy(prompt=[1, 520, 33, 4000], max_tokens=10, logprobs=0)
    first = complete(client, **body)["choices"][0]["logprobs"]["tokens"]
    words = [first[0].strip(), first[3].strip()]
    banned = {ids for ids in service.bad_word_ids(tuple(words))}
    out = complete(client, **body, bad_words=words)["choices"][0]["logprobs"]["tokens"]
    assert out[0] != first[0]
    ids = [service.tokenizer.convert_tokens_to_ids(service.tokenizer.tokenize(t)) for t in out]
    flat = [i for part in ids for i in part]
    for word in banned:
        assert not any(tuple(flat[k : k + len(word)]) == word for k in range(len(flat))), word
