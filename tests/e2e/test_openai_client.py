"""End to end: the real server process with the embedded SmolLM2-135M-Instruct, driven by the
official `openai` client over loopback HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.server_process import Server, openai_client, running_server

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:  # loopback only: never through a proxy
        yield client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http: httpx.Client) -> Iterator[Server]:
    args = ["--max-num-seqs", "4", "--max-model-len", str(MAX_MODEL_LEN)]
    with running_server(args, tmp_path_factory.mktemp("e2e"), http) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai_client(server) as api:
        yield api


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=48)  # type: ignore[arg-type]
    assert response.model == MODEL
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content is not None and "Paris" in choice.message.content, choice.message.content
    assert choice.finish_reason == "stop"
    assert response.usage is not None
    assert response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_completion_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=48, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices, "no chunks with choices"
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert "Paris" in text, text
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    # Same greedy request, same answer as without streaming.
    reference = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=48)  # type: ignore[arg-type]
    assert text == reference.choices[0].message.content


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert response.model == MODEL
    assert len(response.choices) == 1
    assert "Paris" in response.choices[0].text, response.choices[0].text
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.usage is not None and response.usage.prompt_tokens > 0


def test_completion_streaming(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    reference = client.completions.create(**request)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].text for c in with_choices)
    assert text == reference.choices[0].text
    assert with_choices[-1].choices[0].finish_reason == reference.choices[0].finish_reason
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == reference.usage.completion_tokens  # type: ignore[union-attr]


def test_logprobs_through_the_client(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:  # greedy: every token is its position's most likely
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
    # lm-evaluation-harness's request: score a prompt, generate nothing
    scored = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0,
                                       echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == "The capital of France is Paris" and scored.usage.completion_tokens == 0  # type: ignore[union-attr]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs[0] is None and all(v < 0 for v in logprobs.token_logprobs[1:])  # type: ignore[operator]
    assert "".join(logprobs.tokens) == choice.text


def test_json_schema_through_the_client(client: openai.OpenAI) -> None:
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["city", "country"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60,  # type: ignore[arg-type]
                                              response_format=fmt)  # type: ignore[arg-type]
    text = response.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), schema)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60,  # type: ignore[arg-type]
                                            response_format=fmt, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    choice = client.completions.create(model=MODEL, prompt="Is Paris in France? Answer:", max_tokens=5,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert MODEL in ids


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_too_many_tokens_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=MAX_MODEL_LEN * 4)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert caught.value.param == "max_tokens"


def test_health_answers_during_a_long_generation(client: openai.OpenAI, server: Server, http: httpx.Client) -> None:
    """The event loop never waits on the engine: /health is fast while tokens are being generated.
    Last in the module: the long request is abandoned once /health has been checked."""
    first_text = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []
    received: list[str] = []
    before = http.get(f"{server.base_url}/ready", timeout=5.0).json()["finished"]

    def generate() -> None:
        try:
            stream = client.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=400, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )
            with stream:
                for chunk in stream:
                    if chunk.choices:
                        received.append(chunk.choices[0].text)
                        first_text.set()
                    if done.is_set():
                        break  # closing the stream abandons the request
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
        finally:
            first_text.set()

    worker = threading.Thread(target=generate, name="long-generation", daemon=True)
    worker.start()
    try:
        assert first_text.wait(60), "the long generation produced nothing"
        assert not errors, errors
        for _ in range(3):
            start = time.monotonic()
            response = http.get(f"{server.base_url}/health", timeout=1.0)
            elapsed = time.monotonic() - start
            assert response.status_code == 200 and response.json() == {"status": "ok"}
            assert elapsed < 1.0, f"/health took {elapsed:.2f} s"
        ready = http.get(f"{server.base_url}/ready", timeout=1.0).json()
        assert ready["running"] == 1, ready  # the generation really was in flight
    finally:
        done.set()
        worker.join(30)
    assert not worker.is_alive()
    assert not errors, errors
    assert 0 < len(received) < 400
    # The abandoned request is cancelled in the engine rather than run to 400 tokens: the engine
    # counts how each request ended, so this holds however fast the host generates (the deadline
    # only bounds a hang).
    deadline = time.monotonic() + 300
    while (ready := http.get(f"{server.base_url}/ready", timeout=5.0).json())["running"]:
        assert time.monotonic() < deadline, f"the abandoned request is still running: {ready}"
        time.sleep(0.1)
    after = ready["finished"]
    assert after["abort"] == before["abort"] + 1, (before, after)
    assert after["length"] == before["length"], f"the abandoned request ran to max_tokens: {before} -> {after}"