"""POST /tokenize, POST /detokenize and GET /tokenizer_info (vLLM's shapes) on the tiny chat
Llama with the SmolLM2 tokenizer: the ids equal the tokenizer's and what the completion routes count as the prompt,
chat messages go through the chat template as /v1/chat/completions does, and bad input is a
400/404 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.server.test_api import wait_ready

KEY = "tok-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path) -> Iterator[TestClient]:
    settings = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=128, api_key=KEY)
    app = create_app(lambda metrics: build_service(settings, metrics), api_key=KEY)
    with TestClient(app) as test_client:
        test_client.headers.update(AUTH)
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_a_prompt_is_tokenized_as_the_completion_route_counts_it(client: TestClient, tokenizer: Any) -> None:
    text = "Hello there, how are you?"
    body = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    usage = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False) and plain["token_strs"] is None


def test_messages_go_through_the_chat_template(client: TestClient, tokenizer: Any) -> None:
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    body = client.post("/tokenize", json={"messages": MESSAGES}).json()
    assert body["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    usage = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    bare = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]


def test_detokenize_inverts_tokenize(client: TestClient, tokenizer: Any) -> None:
    text = "Paris is the capital of France."
    ids = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}


@pytest.mark.parametrize(("route", "body", "status", "phrase"), [
    ("tokenize", {}, 400, "either `prompt` or `messages`"),
    ("tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "either `prompt` or `messages`"),
    ("tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "cannot both be true"),
    ("tokenize", '{"prompt": "a\\ud800"}', 400, "lone surrogate"),
    ("tokenize", {"prompt": "a", "model": "no-such-adapter"}, 404, "no-such-adapter"),
    ("detokenize", {"tokens": [1, 10**12]}, 400, "token ids must be in"),
    ("detokenize", {"tokens": [-1]}, 400, "token ids must be in"),
    ("detokenize", {"tokens": "12"}, 400, "tokens"),
])
def test_bad_input_is_refused(client: TestClient, route: str, body: dict[str, Any] | str, status: int,
                              phrase: str) -> None:
    if isinstance(body, str):  # raw JSON: a lone surrogate cannot be encoded by the client
        response = client.post(f"/{route}", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(f"/{route}", json=body)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]["message"]


def test_the_api_key_is_required(client: TestClient) -> None:
    assert client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_tokenizer_info_names_the_special_tokens_and_template(client: TestClient, tokenizer: Any) -> None:
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == 128 and info["vocab_size"] >= len(tokenizer)
    assert client.get("/tokenizer_info", headers={"Authorization": "Bearer wrong"}).status_code == 401
