"""A completion cut by max_tokens inside a multi-byte character ends before that character, in
the stream and in the non-streamed answer alike: no U+FFFD the model did not produce."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.detokenize import REPLACEMENT
from tests.server.families import make_cycle_llama
from tests.server.test_api import sse_events, split_stream, texts_by_index, wait_ready

PARTY = "🎉"
PARTY_IDS = [10813, 232, 227]  # the embedded tokenizer spells 🎉 as 3 byte-level tokens


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = make_cycle_llama(tmp_path_factory.mktemp("cycle") / "party", PARTY_IDS)
    settings = Settings(model=str(folder), max_num_seqs=2, max_model_len=64)
    with TestClient(create_app(lambda metrics: build_service(settings, metrics))) as test_client:
        wait_ready(test_client)
        yield test_client


def test_the_model_repeats_the_emoji(client: TestClient) -> None:
    tokenizer = client.app.state.holder.service.tokenizer  # type: ignore[attr-defined]
    assert tokenizer.encode(PARTY, add_special_tokens=False) == PARTY_IDS
    body = {"prompt": f"Party {PARTY}", "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == PARTY * 3


@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5, 7, 8])
def test_cut_character_is_dropped_streamed_or_not(client: TestClient, max_tokens: int) -> None:
    body = {"prompt": f"Party {PARTY}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    streamed, finishes = texts_by_index(
        split_stream(sse_events(client.post("/v1/completions", json={**body, "stream": True})))[0], 1, chat=False
    )
    assert plain["finish_reason"] == finishes[0] == "length"
    assert plain["text"] == streamed[0] == PARTY * (max_tokens // 3)
    assert REPLACEMENT not in plain["text"]
