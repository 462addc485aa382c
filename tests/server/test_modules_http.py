"""modules_to_save over HTTP (in process, the tiny chat Llama): an adapter that adds 8 tokens and
saves its embedding and head answers prompts that use them, the base model refuses those ids,
the adapter's features and the module slots' memory are reported, and a mix with it is a 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.adapters.helpers import write_random_adapter
from tests.adapters.test_modules_to_save import make_saving_adapter
from tests.server.test_admin_api import AUTH, TOKEN, ready

ADDED = 8


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, int]]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mts-http")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    vocab = hf.config.vocab_size
    make_saving_adapter(hf, root / "full", seed=60, modules=["embed_tokens", "lm_head"], added=ADDED)
    write_random_adapter(root / "plain", tiny_llama_dir, rank=4, targets=["q_proj"], seed=61)
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=64, max_loras=2, max_lora_rank=8,
                    max_module_slots=1, max_added_tokens=ADDED,
                    lora_modules={"full": str(root / "full"), "plain": str(root / "plain")})
    app = create_app(lambda metrics: build_service(conf, metrics), admin_token=TOKEN)
    with TestClient(app) as client:
        yield ready(client), vocab


def test_added_tokens_are_served_by_their_adapter_only(setup: tuple[TestClient, int]) -> None:
    client, vocab = setup
    ids = [1, 2, vocab + 3, 4, vocab + 7]
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    ok = client.post("/v1/completions", json={**body, "model": "full"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4
    refused = client.post("/v1/completions", json=body)
    assert refused.status_code == 400 and f"[0, {vocab})" in refused.json()["error"]["message"]
    stop = client.post("/v1/completions", json={**body, "model": "full", "stop_token_ids": [vocab + 1]})
    assert stop.status_code == 200, stop.text


def test_features_and_module_slot_memory_are_reported(setup: tuple[TestClient, int]) -> None:
    client, vocab = setup
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["full"]["features"] == {"dora": False, "modules_to_save": ["embed_tokens", "lm_head"],
                                         "trainable_tokens": 0, "scalable": True, "mixable": False}
    assert cards["plain"]["features"]["mixable"] is True
    model = client.get("/admin/model", headers=AUTH).json()
    hidden = 64
    assert model["module_slots"] == {"count": 1, "vocab": vocab + ADDED, "bytes": 2 * (vocab + ADDED) * hidden * 4}
    adapters = {a["name"]: a for a in client.get("/admin/adapters", headers=AUTH).json()["adapters"]}
    assert adapters["full"]["features"]["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_a_mix_with_saved_modules_is_refused(setup: tuple[TestClient, int]) -> None:
    client, _ = setup
    response = client.post("/v1/completions", json={"model": "full+plain", "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 400 and "modules_to_save" in response.json()["error"]["message"]
