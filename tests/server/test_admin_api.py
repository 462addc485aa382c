"""The admin API on a tiny model: authentication, every route, every source, every bad input."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.conftest import seed_hub_cache
from tests.adapters.helpers import write_random_adapter

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOOPBACK = ("127.0.0.1", 40000)
Json = dict[str, Any]


def settings(model: Path, data: Path, **extra: Any) -> Settings:
    return Settings(model=str(model), max_num_seqs=4, max_model_len=128, max_loras=2, max_lora_rank=8,
                    data_dir=data, max_upload_mb=0.2, **extra)


def ready(client: TestClient) -> TestClient:
    for _ in range(600):
        if client.get("/ready").status_code == 200:
            return client
        time.sleep(0.05)
    raise AssertionError("not ready")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("roots")


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, roots: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    conf = settings(tiny_llama_dir, tmp_path_factory.mktemp("data"), adapter_roots=[roots])
    app = create_app(lambda metrics: build_service(conf, metrics), admin_token=TOKEN)
    with TestClient(app, client=("203.0.113.9", 5000)) as test_client:  # a remote address
        yield ready(test_client)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "one": write_random_adapter(root / "one", tiny_llama_dir, rank=4, targets=["q_proj", "v_proj"], seed=1, scale=2.0),
        "two": write_random_adapter(root / "two", tiny_llama_dir, rank=8, targets=["o_proj", "down_proj"], seed=2, scale=2.0),
        "big": write_random_adapter(root / "big", tiny_llama_dir, rank=16, targets=["q_proj"], seed=3),
    }


def files(folder: Path, weights: bytes | None = None) -> dict[str, tuple[str, bytes]]:
    return {
        "adapter_config.json": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model.safetensors": (
            "adapter_model.safetensors", weights if weights is not None else (folder / "adapter_model.safetensors").read_bytes()
        ),
    }


def upload(client: TestClient, name: str, folder: Path, *, weights: bytes | None = None) -> Any:
    return client.put(f"/admin/adapters/{name}", files=files(folder, weights), headers=AUTH)


def greedy(client: TestClient, model: str) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def error(response: Any, status: int, *phrases: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, message


# ---- authentication ------------------------------------------------------------------------


def test_token_is_required(client: TestClient) -> None:
    response = client.get("/admin/adapters")
    error(response, 401, "admin token")
    assert response.headers["www-authenticate"] == "Bearer"
    error(client.get("/admin/adapters", headers={"Authorization": "Bearer wrong"}), 401)
    error(client.get("/admin/adapters", headers={"Authorization": TOKEN}), 401)  # no scheme
    assert client.get("/admin/adapters", headers=AUTH).status_code == 200
    for method, path in [("PUT", "/admin/adapters/x"), ("DELETE", "/admin/adapters/x"), ("POST", "/admin/adapters/x/load"),
                         ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")]:
        assert client.request(method, path).status_code == 401, path


def test_model_info_reports_slots_given_by_the_flag(client: TestClient, tiny_llama_dir: Path) -> None:
    info = client.get("/admin/model", headers=AUTH).json()
    slots = info["lora_slots"]
    assert {k: slots[k] for k in ("count", "rank", "budget_bytes", "sized_by")} == {
        "count": 2, "rank": 8, "budget_bytes": None, "sized_by": "flag"}
    assert slots["bytes"] == 3 * slots["bytes_per_slot"] == info["memory"]["lora_slot_bytes"]  # null slot too
    kv = info["kv_cache"]
    # 4 requests of 128 positions in blocks of 16 (the 1 GiB default holds more), plus the
    # scratch and zero blocks, keys and values, float32.
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert kv["blocks"] == 4 * 128 // 16 and kv["tokens"] == kv["blocks"] * 16 and kv["prefix_caching"] is True
    per_position = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    assert kv["bytes"] == (kv["blocks"] + 2) * 16 * per_position == info["memory"]["kv_cache_bytes"]


def test_without_a_token_only_loopback_administers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    conf = settings(tiny_llama_dir, tmp_path / "data", api_key="inference-key")
    app = create_app(lambda metrics: build_service(conf, metrics), api_key="inference-key")
    with TestClient(app, client=("203.0.113.9", 5000)) as remote:
        ready(remote)
        error(remote.get("/admin/adapters"), 403, "loopback")
        error(remote.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}), 401, "API key")
        assert remote.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                           headers={"Authorization": "Bearer inference-key"}).status_code == 200
        assert remote.get("/health").status_code == 200
    local_app = create_app(lambda metrics: build_service(settings(tiny_llama_dir, tmp_path / "data2"), metrics))
    with TestClient(local_app, client=LOOPBACK) as local:
        ready(local)
        assert local.get("/admin/adapters").json() == {"adapters": []}


# ---- publishing, hotswap, listing ------------------------------------------------------------


def test_upload_then_replace_with_a_new_version(client: TestClient, adapters: dict[str, Path]) -> None:
    base = greedy(client, "tiny-llama")
    response = upload(client, "ad", adapters["one"])
    assert response.status_code == 200, response.text
    body = response.json()
    folder = adapters["one"]
    expected = hashlib.sha256((folder / "adapter_config.json").read_bytes() + (folder / "adapter_model.safetensors").read_bytes())
    assert body["version"] == expected.hexdigest() and body["replaced"] is None
    assert (body["rank"], body["alpha"], body["target_modules"]) == (4, 4.0, ["q_proj", "v_proj"])
    assert body["size"] == sum(p.stat().st_size for p in folder.iterdir())
    first = greedy(client, "ad")
    assert first != base

    again = upload(client, "ad", adapters["two"]).json()
    assert again["replaced"] == body["version"] and again["version"] != body["version"]
    second = greedy(client, "ad")
    assert second not in (first, base)
    status = client.get("/admin/adapters/ad", headers=AUTH).json()
    assert [v["version"] for v in status["versions"]] == [body["version"], again["version"]]
    assert status["version"] == again["version"] and status["requests"] == 2 and status["last_used"] is not None
    assert "ad" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    # The replaced version is not kept marked once no queued request needs it (greedy() ran one
    # engine step after the replace at least).
    engine = client.app.state.holder.service.engine  # type: ignore[attr-defined]
    assert engine.call(engine.slot_table.retired).result(10) == frozenset()


def test_load_pin_unload_delete(client: TestClient, adapters: dict[str, Path]) -> None:
    assert upload(client, "p1", adapters["one"]).status_code == 200
    assert upload(client, "p2", adapters["two"]).status_code == 200
    loaded = client.post("/admin/adapters/p1/load", json={"pin": True}, headers=AUTH).json()
    assert loaded["tier"] == "slot" and loaded["pinned"] is True and loaded["slot"] in (0, 1)
    # Two slots: pinning the second would leave none for other adapters.
    error(client.post("/admin/adapters/p2/load", json={"pin": True}, headers=AUTH), 409, "no slot")
    assert client.post("/admin/adapters/p2/load", headers=AUTH).json()["pinned"] is False
    unloaded = client.post("/admin/adapters/p1/unload", headers=AUTH).json()
    assert unloaded["tier"] == "cpu" and unloaded["slot"] is None and unloaded["pinned"] is False
    greedy(client, "p1")  # served again after an unload, and then stays resident like any adapter
    assert client.get("/admin/adapters/p1", headers=AUTH).json()["tier"] == "slot"
    reloaded = client.post("/admin/adapters/p1/load", headers=AUTH)
    assert reloaded.status_code == 200 and reloaded.json()["tier"] == "slot"
    assert client.post("/admin/adapters/p1/unload", headers=AUTH).json()["tier"] == "cpu"
    listing = {a["name"]: a for a in client.get("/admin/adapters", headers=AUTH).json()["adapters"]}
    assert {"p1", "p2"} <= set(listing) and listing["p2"]["tier"] == "slot"
    assert client.delete("/admin/adapters/p2", headers=AUTH).json() == {"name": "p2", "deleted": True}
    error(client.post("/v1/completions", json={"model": "p2", "prompt": "x", "max_tokens": 1}), 404, "p2")
    error(client.get("/admin/adapters/p2", headers=AUTH), 404)
    error(client.delete("/admin/adapters/p2", headers=AUTH), 404)


def test_server_paths_only_inside_roots(client: TestClient, adapters: dict[str, Path], roots: Path, tmp_path: Path) -> None:
    target = roots / "good"
    target.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((adapters["one"] / name).read_bytes())
    ok = client.put("/admin/adapters/bypath", json={"path": str(target)}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["source"].startswith("path:")
    error(client.put("/admin/adapters/x", json={"path": str(adapters["one"])}, headers=AUTH), 403, "outside")
    error(client.put("/admin/adapters/x", json={"path": f"{roots}/../{adapters['one'].parent.name}/one"}, headers=AUTH), 403)
    escape = roots / "escape"
    escape.symlink_to(adapters["one"], target_is_directory=True)
    error(client.put("/admin/adapters/x", json={"path": str(escape)}, headers=AUTH), 403, "outside")
    sneaky = roots / "sneaky"  # a real folder inside whose weights file links outside
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_bytes((adapters["one"] / "adapter_config.json").read_bytes())
    (sneaky / "adapter_model.safetensors").symlink_to(adapters["one"] / "adapter_model.safetensors")
    error(client.put("/admin/adapters/x", json={"path": str(sneaky)}, headers=AUTH), 403)
    error(client.put("/admin/adapters/x", json={"path": "relative/dir"}, headers=AUTH), 400, "absolute")
    # vLLM's routes use the same checks.
    vllm = client.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(target)}, headers=AUTH)
    assert vllm.status_code == 200
    error(client.post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(escape)}, headers=AUTH), 403)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=AUTH).status_code == 200
    error(client.post("/v1/completions", json={"model": "v", "prompt": "x", "max_tokens": 1}), 404)


def test_hub_source_reports_an_unreachable_hub(client: TestClient) -> None:
    response = client.put("/admin/adapters/h", json={"hub_id": "someone/some-adapter", "revision": "main"}, headers=AUTH)
    error(response, 502, "cannot resolve adapter 'someone/some-adapter'")
    error(client.put("/admin/adapters/h", json={"hub_id": "../etc"}, headers=AUTH), 400, "org/name")
    error(client.put("/admin/adapters/h", json={"path": "/x", "hub_id": "a/b"}, headers=AUTH), 400, "exactly one")


# ---- bad input: a 4xx, nothing published, the server keeps serving ----------------------------


def _truncated(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()[:-100]


def _absurd_header(folder: Path) -> bytes:
    data = (folder / "adapter_model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [1 << 40, 1 << 20]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len :]


def _edited(folder: Path, tmp: Path, change: Any) -> bytes:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, str(tmp / "w.safetensors"))
    return (tmp / "w.safetensors").read_bytes()


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    next(iter(tensors.values()))[0, 0] = float("nan")


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


@pytest.mark.parametrize(
    ("case", "status", "phrase"),
    [
        ("truncated", 400, "not a valid safetensors file"),
        ("absurd-header", 400, "not a valid safetensors file"),
        ("nan", 400, "NaN"),
        ("wrong-shape", 400, "shape"),
        ("rank-above-slots", 400, "rank"),
        ("too-large", 413, "limit"),
    ],
)
def test_bad_uploads(client: TestClient, adapters: dict[str, Path], tmp_path: Path, case: str, status: int, phrase: str) -> None:
    one = adapters["one"]
    folder, weights = one, None
    if case == "truncated":
        weights = _truncated(one)
    elif case == "absurd-header":
        weights = _absurd_header(one)
    elif case == "nan":
        weights = _edited(one, tmp_path, _nan)
    elif case == "wrong-shape":
        weights = _edited(one, tmp_path, _wrong_shape)
    elif case == "rank-above-slots":
        folder = adapters["big"]
    elif case == "too-large":
        weights = b"\0" * 300_000
    error(upload(client, "bad", folder, weights=weights), status, phrase)
    error(client.get("/admin/adapters/bad", headers=AUTH), 404)
    assert greedy(client, "tiny-llama")  # still serving


def test_bad_forms_and_names(client: TestClient, adapters: dict[str, Path]) -> None:
    one = adapters["one"]
    only_config = {"adapter_config.json": files(one)["adapter_config.json"]}
    error(client.put("/admin/adapters/bad", files=only_config, headers=AUTH), 400, "adapter_model.safetensors")
    pickle = {**only_config, "adapter_model.bin": ("adapter_model.bin", b"\x80\x04K\x01.")}
    error(client.put("/admin/adapters/bad", files=pickle, headers=AUTH), 400, "pickle")
    error(client.put("/admin/adapters/bad", content=b"raw", headers={**AUTH, "content-type": "text/plain"}), 400, "multipart")
    for name in ("bad name", "x" * 65, "tiny-llama"):  # reach the handler: refused by the name rule
        response = client.put(f"/admin/adapters/{name}", files=files(one), headers=AUTH)
        error(response, 400)
        assert response.json()["error"]["code"] == "invalid_adapter", name
    # Path-like names never reach it: ".." is resolved by the client, "%2F" matches no route.
    for name in ("..", "a%2Fb"):
        assert client.put(f"/admin/adapters/{name}", files=files(one), headers=AUTH).status_code == 404, name
    assert client.put("/admin/adapters/", files=files(one), headers=AUTH).status_code == 405
    listed = {a["name"] for a in client.get("/admin/adapters", headers=AUTH).json()["adapters"]}
    assert not listed & {"bad", "..", "bad name", "tiny-llama"}


def test_catalog_survives_a_restart(tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    conf = settings(tiny_llama_dir, tmp_path / "data")
    app = create_app(lambda metrics: build_service(conf, metrics))
    with TestClient(app, client=LOOPBACK) as first:
        ready(first)
        version = first.put("/admin/adapters/keep", files=files(adapters["one"])).json()["version"]
        answer = greedy(first, "keep")
    app = create_app(lambda metrics: build_service(conf, metrics))
    with TestClient(app, client=LOOPBACK) as second:
        ready(second)
        status = second.get("/admin/adapters/keep").json()
        assert status["version"] == version and status["tier"] == "disk"
        assert greedy(second, "keep") == answer


def test_hotswap_under_load_never_fails_or_mixes_versions(client: TestClient, adapters: dict[str, Path]) -> None:
    versions = [adapters["one"], adapters["two"]]
    expected = []
    for folder in versions:
        assert upload(client, "swap", folder).status_code == 200
        expected.append(greedy(client, "swap"))
    assert expected[0] != expected[1]
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            response = client.post("/v1/completions", json={"model": "swap", "prompt": "hello there", "max_tokens": 8,
                                                             "temperature": 0, "ignore_eos": True})
            if response.status_code != 200:
                failures.append(response.text)
            else:
                answers.append(response.json()["choices"][0]["text"])

    callers = [threading.Thread(target=keep_calling) for _ in range(2)]
    for thread in callers:
        thread.start()
    try:
        for i in range(20):
            assert upload(client, "swap", versions[i % 2]).status_code == 200
            # Each swap waits for one more answer, not for a while: requests and swaps interleave
            # however fast or slow the host is.
            wanted = len(answers) + 1
            deadline = time.monotonic() + 120
            while len(answers) < wanted and not failures:
                assert time.monotonic() < deadline, "no answer came after a swap"
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in callers:
            thread.join(60)
    assert not failures and len(answers) >= 20
    assert set(answers) <= set(expected), set(answers) - set(expected)  # each entirely one version
    from tests.server.test_api import wait_idle

    stats = wait_idle(client)["slots"]  # /ready reports as of the engine's last step
    assert stats["references"] == [0, 0]
    current = "swap@" + client.get("/admin/adapters/swap", headers=AUTH).json()["version"][:16]
    assert all(key == current for key in stats["resident"] if key.startswith("swap@"))  # old versions left


class PausedEngine:
    """Blocks the engine thread at the start of its next step with decode rows until `resume()`:
    the request in flight then stays in flight, however fast the host generates."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.real = engine, engine.runner.step
        self.paused, self._resume = threading.Event(), threading.Event()
        engine.runner.step = self._step

    def _step(self, rows: list[int], chunks: Any = ()) -> Any:
        if rows and not self._resume.is_set():
            self.paused.set()
            self._resume.wait(120)
        return self.real(rows, chunks)

    def resume(self) -> None:
        self._resume.set()
        self.engine.runner.step = self.real


def test_delete_lets_running_requests_finish(client: TestClient, adapters: dict[str, Path]) -> None:
    assert upload(client, "doomed", adapters["one"]).status_code == 200
    body = {"model": "doomed", "prompt": "hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    engine = client.app.state.holder.service.engine  # type: ignore[attr-defined]
    unloading = threading.Event()
    real_unload = engine.unload_adapter
    engine.unload_adapter = lambda *a, **k: (unloading.set(), real_unload(*a, **k))[1]
    deleted: list[Any] = []
    pause = PausedEngine(engine)
    try:
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert pause.paused.wait(60), "the request never reached its second token"
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first  # the request is running on the adapter ...
            assert client.get("/ready").json()["running"] == 1  # ... and still is when the DELETE lands
            deleter = threading.Thread(target=lambda: deleted.append(client.delete("/admin/adapters/doomed", headers=AUTH)))
            deleter.start()
            assert unloading.wait(60), "the DELETE never asked the engine to unload"
            pause.resume()
            rest = [line for line in lines if line.startswith("data: ")]
        deleter.join(60)
    finally:
        pause.resume()
        engine.unload_adapter = real_unload
    assert deleted and deleted[0].status_code == 200, deleted
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert all("error" not in chunk for chunk in chunks)
    assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in chunks)
    # It finished on the deleted adapter's weights, all 60 tokens of them.
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    error(client.post("/v1/completions", json={"model": "doomed", "prompt": "x", "max_tokens": 1}), 404)
    assert not [k for k in client.get("/ready").json()["slots"]["resident"] if k.startswith("doomed@")]


def test_hub_source_from_the_offline_cache(client: TestClient, adapters: dict[str, Path], offline_hub: Path) -> None:
    seed_hub_cache(offline_hub, "someorg/cached-lora", adapters["one"], "b" * 40)
    response = client.put("/admin/adapters/fromhub", json={"hub_id": "someorg/cached-lora"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "hub:someorg/cached-lora@main"
    assert greedy(client, "fromhub")
    error(client.put("/admin/adapters/h2", json={"hub_id": "someorg/not-cached"}, headers=AUTH), 502, "HF_HUB_OFFLINE")


def test_a_mix_the_pins_leave_no_room_for_is_a_400(client: TestClient, adapters: dict[str, Path]) -> None:
    """Two slots, one pinned by another adapter: a mix of two others can never be resident
    together, which the service says at once (400) instead of the engine failing it later."""
    for name, folder in (("m1", "one"), ("m2", "two"), ("m3", "one")):
        assert upload(client, name, adapters[folder]).status_code == 200
    assert client.post("/admin/adapters/m3/load", json={"pin": True}, headers=AUTH).json()["pinned"] is True
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})  # a step publishes the pins
    for _ in range(100):
        if client.get("/ready").json()["slots"]["pinned"]:
            break
        time.sleep(0.05)
    response = client.post("/v1/completions", json={"model": "m1+m2", "prompt": "hi", "max_tokens": 2})
    error(response, 400, "pinned by other adapters")
    ok = client.post("/v1/completions", json={"model": "m1:0.5+m3:0.5", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text  # the pinned adapter itself is part of this mix
    client.post("/admin/adapters/m3/load", json={"pin": False}, headers=AUTH)
