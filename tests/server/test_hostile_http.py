"""Hostile requests over HTTP (in process, tiny model): each is a 4xx naming what is wrong, and
64 of every kind leave the server exactly as it was: same outputs, every row free, healthy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.adapters.helpers import write_random_adapter
from tests.server.test_admin_api import AUTH, TOKEN, files, ready

ROWS = 4
HEADERS = {"Content-Type": "application/json"}
PROMPTS = ["Hello there", "One two three", "The sky is"]

# (id, raw JSON body for /v1/completions or /v1/chat/completions, status, phrase in the message)
INFERENCE: list[tuple[str, str, str, int, str]] = [
    ("top-k-past-int64", "completions", '{"prompt": "hi", "max_tokens": 2, "top_k": 100000000000000000000}', 400, "top_k"),
    ("lone-surrogate-prompt", "completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "lone surrogate"),
    ("lone-surrogate-chat", "chat/completions",
     '{"messages": [{"role": "user", "content": "x\\udfffy"}], "max_tokens": 2}', 400, "lone surrogate"),
    ("lone-surrogate-stop", "completions", '{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}', 400, "stop"),
    ("nested-100k", "completions", "[" * 100_000 + "]" * 100_000, 400, ""),
    ("nested-object-100k", "completions", '{"prompt": ' + '{"a": ' * 20_000 + "1" + "}" * 20_001, 400, ""),
    ("temperature-nan", "completions", '{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', 400, "temperature"),
    ("top-p-infinity", "completions", '{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', 400, "top_p"),
    ("token-id-past-int64", "completions", '{"prompt": [1, 100000000000000000000], "max_tokens": 2}', 400, "prompt"),
    ("token-id-negative", "completions", '{"prompt": [1, -5], "max_tokens": 2}', 400, "prompt"),
    ("stop-id-huge", "completions", '{"prompt": "hi", "max_tokens": 2, "stop_token_ids": [100000000000000000000]}', 400, "stop_token_ids"),
    ("max-tokens-huge", "completions", '{"prompt": "hi", "max_tokens": 100000000000000000000}', 400, "max_tokens"),
    ("seed-huge", "completions", '{"prompt": "hi", "max_tokens": 2, "seed": 100000000000000000000}', 400, "seed"),
    ("too-many-choices", "completions", json.dumps({"prompt": ["a"] * 200, "n": 2, "max_tokens": 1}), 400, "completions"),
    ("prompt-number", "completions", '{"prompt": 5, "max_tokens": 2}', 400, "prompt"),
    ("messages-not-list", "chat/completions", '{"messages": "hi"}', 400, "messages"),
    ("bad-role", "chat/completions", '{"messages": [{"role": "root", "content": "hi"}]}', 400, "role"),
    ("lora-scale-nan", "completions", '{"prompt": "hi", "max_tokens": 2, "lora_scale": NaN}', 400, "lora_scale"),
    ("lora-scale-huge", "completions", '{"prompt": "hi", "max_tokens": 2, "lora_scale": 1e300}', 400, "lora_scale"),
    ("lora-scale-string", "completions", '{"prompt": "hi", "max_tokens": 2, "lora_scale": "half"}', 400, "lora_scale"),
    ("lora-scale-base-model", "completions", '{"prompt": "hi", "max_tokens": 2, "lora_scale": 0.5}', 400, "lora_scale"),
    ("mix-weight-nan", "completions", '{"model": "a:nan+b", "prompt": "hi", "max_tokens": 2}', 400, "finite"),
    ("mix-weight-huge", "completions", '{"model": "a:1e300+b", "prompt": "hi", "max_tokens": 2}', 400, "finite"),
    ("mix-weight-text", "completions", '{"model": "a:half+b", "prompt": "hi", "max_tokens": 2}', 400, "not a number"),
    ("mix-twice", "completions", '{"model": "a:0.5+a:0.5", "prompt": "hi", "max_tokens": 2}', 400, "appears twice"),
    ("mix-empty-name", "completions", '{"model": "+a", "prompt": "hi", "max_tokens": 2}', 400, "empty"),
    ("mix-too-many", "completions", json.dumps({"model": "+".join(f"a{i}" for i in range(9)), "prompt": "hi"}), 400,
     "1 to 8"),
    ("mix-too-long", "completions", json.dumps({"model": "a+" + "b" * 5000, "prompt": "hi"}), 400, "characters"),
    ("mix-over-slots", "completions", '{"model": "a+b+c", "prompt": "hi", "max_tokens": 2}', 400, "--max-loras"),
    ("mix-unknown", "completions", '{"model": "nope1+nope2", "prompt": "hi", "max_tokens": 2}', 404, "nope1"),
    ("adapters-inf", "chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
     '"adapters": [{"name": "a", "weight": Infinity}]}', 400, "adapters"),
    ("adapters-extra-key", "completions", '{"prompt": "hi", "adapters": [{"name": "a", "path": "/etc"}]}', 400,
     "adapters"),
    ("adapters-empty", "completions", '{"prompt": "hi", "adapters": []}', 400, "adapters"),
    ("adapters-not-list", "completions", '{"prompt": "hi", "adapters": {"name": "a"}}', 400, "adapters"),
    ("adapters-too-many", "completions", json.dumps({"prompt": "hi", "adapters": [{"name": f"a{i}"} for i in range(9)]}),
     400, "adapters"),
    ("adapters-and-adapter-model", "completions", '{"model": "x", "prompt": "hi", "adapters": [{"name": "a"}]}', 400,
     "names the base model"),
]


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    roots = tmp_path_factory.mktemp("roots")
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=ROWS, max_model_len=128, max_loras=2, max_lora_rank=8,
                    data_dir=tmp_path_factory.mktemp("data"), max_upload_mb=0.2, adapter_roots=[roots])
    app = create_app(lambda metrics: build_service(conf, metrics), admin_token=TOKEN)
    with TestClient(app) as test_client:
        yield ready(test_client)


def outputs(client: TestClient) -> list[str]:
    """Normal traffic: a few greedy completions and a chat, base model."""
    texts = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    return texts + [chat.json()["choices"][0]["message"]["content"]]


def assert_idle_and_healthy(client: TestClient) -> None:
    from tests.server.test_api import wait_idle

    ready_body = wait_idle(client)  # /ready reports as of the engine's last step
    assert ready_body["status"] == "ready", ready_body
    engine = client.app.state.holder.service.engine  # type: ignore[attr-defined]
    assert sorted(engine._free_rows) == list(range(ROWS))


def error_message(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["message"])


@pytest.mark.parametrize(("route", "raw", "status", "phrase"), [c[1:] for c in INFERENCE], ids=[c[0] for c in INFERENCE])
def test_hostile_inference_request_is_refused(client: TestClient, route: str, raw: str, status: int, phrase: str) -> None:
    message = error_message(client.post(f"/v1/{route}", content=raw, headers=HEADERS), status)
    assert phrase in message, message


def test_top_k_past_the_vocabulary_is_the_whole_vocabulary(client: TestClient) -> None:
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    huge = client.post("/v1/completions", json={**body, "top_k": 2**62}).json()["choices"][0]["text"]
    assert huge == plain


def test_64_of_every_hostile_kind_change_nothing(client: TestClient) -> None:
    before = outputs(client)
    for _, route, raw, status, _ in INFERENCE:
        for _ in range(64):
            assert client.post(f"/v1/{route}", content=raw, headers=HEADERS).status_code == status
    # The engine-level kind too: a request that fails after admission, 64 times (more than rows).
    engine = client.app.state.holder.service.engine  # type: ignore[attr-defined]
    from server.sampling import SamplingParams
    from server.sequence import GenerationRequest

    failed = []
    for i in range(64):
        engine.submit(GenerationRequest(f"x{i}", [5, 6], max_tokens=2, sampling=SamplingParams(top_k=10**20)), failed.append)
    after = outputs(client)  # normal traffic runs meanwhile and after
    assert after == before
    assert sum(e.finish_reason == "error" for e in failed if e.finished) == 64
    assert_idle_and_healthy(client)


# ---- admin ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_adapter(tmp_path_factory.mktemp("ad") / "a", tiny_llama_dir, rank=4, targets=["q_proj"], seed=1)


def edited(adapter: Path, tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return folder


CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("alpha-1e38", {"lora_alpha": 1e38}, "LoRA scaling"),
    ("alpha-nan", {"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ("rank-pattern-list", {"rank_pattern": [4]}, "rank_pattern must be an object"),
    ("rank-pattern-bad-regex", {"rank_pattern": {"(": 4}}, "not a valid regular expression"),
    ("alpha-pattern-null", {"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ("targets-number", {"target_modules": 3}, "target_modules must be a string or a list"),
    ("targets-catastrophic", {"target_modules": r"(\w|\w\w|.)+\d{5}"}, "takes too long to match"),
    ("layers-float", {"layers_to_transform": 1.5}, "layers_to_transform"),
]


@pytest.mark.parametrize(("changes", "phrase"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_hostile_adapter_config_is_a_400(client: TestClient, adapter: Path, tmp_path: Path, changes: dict[str, Any],
                                         phrase: str) -> None:
    folder = edited(adapter, tmp_path, **changes)
    message = error_message(client.put("/admin/adapters/hostile", files=files(folder), headers=AUTH), 400)
    assert phrase in message, message
    assert client.get("/admin/adapters/hostile", headers=AUTH).status_code == 404  # nothing published


def test_deeply_nested_config_and_float8_weights_are_400s(client: TestClient, adapter: Path) -> None:
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    upload = {"adapter_config.json": ("adapter_config.json", nested),
              "adapter_model.safetensors": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes())}
    assert "nested too deeply" in error_message(client.put("/admin/adapters/deep", files=upload, headers=AUTH), 400)
    import torch

    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    path = adapter.parent / "f8.safetensors"
    save_file(tensors, path)
    upload = files(adapter, path.read_bytes())
    assert "float8_e4m3fn" in error_message(client.put("/admin/adapters/f8", files=upload, headers=AUTH), 400)


@pytest.mark.parametrize("path", ["/" + "a" * 5000, "/tmp/x\u0000y", "relative/path"])
def test_hostile_server_paths_are_400s(client: TestClient, path: str) -> None:
    response = client.put("/admin/adapters/p", json={"path": path}, headers=AUTH)
    assert "path" in error_message(response, 400)


def test_a_duplicated_multipart_field_is_a_400(client: TestClient, adapter: Path) -> None:
    config = (adapter / "adapter_config.json").read_bytes()
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    parts = [("adapter_config.json", ("adapter_config.json", config)),
             ("adapter_model.safetensors", ("adapter_model.safetensors", weights)),
             ("adapter_model.safetensors", ("adapter_model.safetensors", b"other"))]
    message = error_message(client.put("/admin/adapters/dup", files=parts, headers=AUTH), 400)
    assert "adapter_model.safetensors twice" in message


def test_parts_may_share_a_field_name(client: TestClient, adapter: Path) -> None:
    """curl -F file=@adapter_config.json -F file=@adapter_model.safetensors: the file names tell
    the parts apart, so one field name for both is fine."""
    parts = [("file", ("adapter_config.json", (adapter / "adapter_config.json").read_bytes())),
             ("file", ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()))]
    response = client.put("/admin/adapters/shared-field", files=parts, headers=AUTH)
    assert response.status_code == 200, response.text
    assert client.delete("/admin/adapters/shared-field", headers=AUTH).status_code == 200


def test_a_chunked_upload_stops_at_the_limit(client: TestClient, adapter: Path) -> None:
    """No Content-Length: the body is counted as it arrives and refused past the limit, before
    the multipart parser spools it anywhere."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
            "filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
    sent = []

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(64):  # 64 MiB, far past 0.2 MB + 1 MiB of slack
            sent.append(1)
            yield b"\0" * (1 << 20)

    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = client.put("/admin/adapters/chunked", content=body(), headers=headers)
    assert "larger than the limit" in error_message(response, 413)
    store = client.app.state.holder.service.catalog.store  # type: ignore[attr-defined]
    assert list((store.root / "tmp").glob("*/*")) == []  # nothing staged (tmp/<owner>/<upload>)
    assert_idle_and_healthy(client)
