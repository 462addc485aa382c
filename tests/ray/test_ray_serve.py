"""`loraswap serve-ray` on a local Ray instance the server process starts itself: a tiny random
model, 2 CPU-only engine replicas of half a core each behind the ingress, 2 slots per replica.
Requests for one adapter land on one replica; an upload through the ingress is served by both
replicas; a disconnect frees its row on the replica; killing a replica fails only its requests
and Ray brings it back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.api.ray_gather import CACHE_S
from tests.adapters.helpers import write_random_adapter
from tests.e2e.server_process import Server, running_server
from tests.server.test_admin_api import files

pytestmark = pytest.mark.e2e

ADAPTERS = ["a0", "a1", "a2", "a3"]
LONG = 2000  # tokens: a generation that runs for seconds (the model copy allows 4096 positions)


KEY = "ray-test-key"  # both the API key and the admin token of the server under test
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=120.0, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with room for long generations (random weights: any length is as good)."""
    folder = tmp_path_factory.mktemp("ray-model") / "tiny-llama"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-adapters")
    names = [*ADAPTERS, "x", "y"]
    return {name: write_random_adapter(root / name, model_dir, rank=4, targets=["q_proj", "v_proj"], seed=i,
                                       scale=3.0) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def server(model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
           http: httpx.Client) -> Iterator[Server]:
    modules = [f"{name}={adapter_dirs[name]}" for name in ADAPTERS]
    args = ["--model", str(model_dir), "--max-model-len", "2048", "--max-num-seqs", "4", "--max-loras", "2",
            "--replicas", "2", "--replica-cpus", "0.5", "--ray-num-cpus", "2", "--max-upload-mb", "1",
            "--api-key", KEY, "--admin-token", KEY,
            "--lora-modules", *modules]
    with running_server(args, tmp_path_factory.mktemp("ray"), http, command_name="serve-ray",
                        stop_timeout_s=60.0) as running:
        wait_for(lambda: ready(running, http)["replicas"]["ready"] == 2, "both replicas ready", running)
        yield running


def ready(server: Server, http: httpx.Client) -> dict[str, Any]:
    response = http.get(f"{server.base_url}/ready")
    return dict(response.json())


def wait_for(condition: Any, what: str, server: Server, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.3)
    pytest.fail(f"not {what} after {timeout_s} s:\n{server.log_tail()}")


def complete(server: Server, http: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}
    return http.post(f"{server.base_url}/v1/completions", json=body)


def greedy(server: Server, http: httpx.Client, model: str) -> str:
    response = complete(server, http, model)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def settled() -> None:
    """The ingress gathers /ready and /metrics at most once per CACHE_S: wait that out before a
    reading that must include what just happened."""
    time.sleep(CACHE_S + 0.1)


def replicas(server: Server, http: httpx.Client) -> dict[str, dict[str, Any]]:
    return dict(ready(server, http)["replica_status"])


def requests_by_replica(server: Server, http: httpx.Client) -> dict[tuple[str, str], float]:
    """(replica, model) -> finished engine requests, from the ingress's merged /metrics."""
    counts: dict[tuple[str, str], float] = {}
    for sample in samples(server, http, "loraswap_requests_total"):
        key = (sample.labels["replica"], sample.labels["model"])
        counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def samples(server: Server, http: httpx.Client, name: str) -> list[Sample]:
    """The samples named `name` on the ingress's merged /metrics."""
    text = http.get(f"{server.base_url}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_ready_health_and_models(server: Server, http: httpx.Client) -> None:
    body = ready(server, http)
    assert body["status"] == "ready" and body["model"] == "tiny-llama"
    assert body["replicas"] == {"configured": 2, "answering": 2, "ready": 2}
    assert len({state["pid"] for state in body["replica_status"].values()}) == 2
    assert http.get(f"{server.base_url}/health").json() == {"status": "ok"}
    models = [m["id"] for m in http.get(f"{server.base_url}/v1/models").json()["data"]]
    assert models[0] == "tiny-llama" and set(ADAPTERS) <= set(models)


def test_errors_are_the_single_process_errors(server: Server, http: httpx.Client) -> None:
    unknown = complete(server, http, "nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    bad = http.post(f"{server.base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400, bad.text
    too_long = complete(server, http, "tiny-llama", max_tokens=10_000)
    assert too_long.status_code == 400, too_long.text
    deep = b'{"model": "a0", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert http.post(f"{server.base_url}/v1/completions", content=deep,
                     headers={"content-type": "application/json"}).status_code == 400
    assert greedy(server, http, "a0")  # and it keeps serving


def test_metrics_carry_each_replica(server: Server, http: httpx.Client) -> None:
    """One scrape of the ingress: every replica's samples, labelled with its id (the LoRA gauge a
    gateway routes on included)."""
    ids = set(replicas(server, http))
    for metric in ("vllm:lora_requests_info", "loraswap_lora_slot_loads_total", "vllm:num_requests_waiting"):
        found = samples(server, http, metric)
        assert sorted(s.labels["replica"] for s in found) == sorted(ids), (metric, found)
    assert http.get(f"{server.base_url}/metrics").text.count("# TYPE vllm:lora_requests_info gauge") == 1


def test_keys_are_checked_at_the_ingress(server: Server) -> None:
    """Without the key nothing reaches a replica: not even the body is read."""
    with httpx.Client(trust_env=False, timeout=60.0) as anonymous:
        big = b"x" * (40 * 2**20)
        refused = anonymous.post(f"{server.base_url}/v1/completions", content=big,
                                 headers={"content-type": "application/json"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert anonymous.get(f"{server.base_url}/v1/models").status_code == 401
        admin = anonymous.put(f"{server.base_url}/admin/adapters/x", content=b"x" * 4_000_000,
                              headers={"Authorization": "Bearer wrong", "content-type": "multipart/form-data; boundary=x"})
        assert admin.status_code == 401 and "admin token" in admin.json()["error"]["message"]
        assert anonymous.get(f"{server.base_url}/health").status_code == 200  # public, as on one process


def test_an_oversized_body_is_refused_at_the_ingress(server: Server, http: httpx.Client) -> None:
    """The ingress holds bodies in memory: past 32 MiB for any route, past --max-upload-mb (+2 MiB
    of form) for an authorized admin upload, a 413 before any replica is involved."""
    big = b'{"model": "a0", "prompt": "' + b"x" * (33 * 2**20) + b'"}'
    response = http.post(f"{server.base_url}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    upload = http.put(f"{server.base_url}/admin/adapters/huge", content=b"x" * 4_000_000,
                      headers={"content-type": "multipart/form-data; boundary=x"})
    assert upload.status_code == 413, upload.text
    assert greedy(server, http, "a0")


def test_requests_for_one_adapter_land_on_one_replica(server: Server, http: httpx.Client) -> None:
    settled()
    before = {rid: state["slots"]["loads"] for rid, state in replicas(server, http).items()}
    counts_before = requests_by_replica(server, http)
    for name in ADAPTERS:  # first sight of each: Ray loads it on the replica holding fewest
        greedy(server, http, name)
        time.sleep(0.5)  # the replica reports what it holds every 0.1 s
    rounds = 5
    for _ in range(rounds):
        for name in ADAPTERS:
            greedy(server, http, name)
    settled()
    after = replicas(server, http)
    loads = sum(state["slots"]["loads"] - before.get(rid, 0) for rid, state in after.items())
    served = len(ADAPTERS) * (rounds + 1)
    # 4 adapters, 2 slots on each of 2 replicas: about one slot load per adapter, not one per request.
    assert loads <= 2 * len(ADAPTERS), f"{loads} slot loads for {served} requests"
    counts = requests_by_replica(server, http)
    for name in ADAPTERS:
        per_replica = Counter({rid: counts.get((rid, name), 0) - counts_before.get((rid, name), 0) for rid in after})
        assert sum(per_replica.values()) == rounds + 1
        assert per_replica.most_common(1)[0][1] >= rounds, f"{name} spread over replicas: {per_replica}"


def upload(server: Server, http: httpx.Client, name: str, folder: Path) -> httpx.Response:
    return http.put(f"{server.base_url}/admin/adapters/{name}", files=files(folder))


def test_upload_replace_delete_through_the_ingress(server: Server, http: httpx.Client,
                                                   adapter_dirs: dict[str, Path]) -> None:
    assert upload(server, http, "y-ref", adapter_dirs["y"]).status_code == 200
    y_text = greedy(server, http, "y-ref")
    created = upload(server, http, "up", adapter_dirs["x"])
    assert created.status_code == 200, created.text
    x_text = greedy(server, http, "up")
    assert x_text != y_text
    # Both replicas serve it: each loads it into a slot when asked to (the store is shared).
    loaded = http.post(f"{server.base_url}/admin/adapters/up/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.headers["x-loraswap-replicas"] == "2"
    settled()
    for state in replicas(server, http).values():
        assert any(key.startswith("up@") for key in state["slots"]["resident"]), state["slots"]
    # A new version through the ingress: every replica serves it to new requests.
    replaced = upload(server, http, "up", adapter_dirs["y"])
    assert replaced.status_code == 200, replaced.text
    assert http.post(f"{server.base_url}/admin/adapters/up/load").status_code == 200
    assert all(greedy(server, http, "up") == y_text for _ in range(4))
    # Deleted through the ingress: no replica serves it any more.
    assert http.delete(f"{server.base_url}/admin/adapters/up").status_code == 200
    assert all(complete(server, http, "up").status_code == 404 for _ in range(4))
    gone = http.post(f"{server.base_url}/admin/adapters/up/load")
    assert gone.status_code == 404, gone.text


def test_disconnect_frees_the_row_on_the_replica(server: Server, http: httpx.Client) -> None:
    settled()
    aborted_before = sum(s["finished"]["abort"] for s in replicas(server, http).values())
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(trust_env=False, timeout=60.0, headers=AUTH) as own:
        with own.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # generating; now go away
    wait_for(lambda: sum(s["finished"]["abort"] for s in replicas(server, http).values()) > aborted_before,
             "aborted on the replica", server, timeout_s=10.0)
    wait_for(lambda: all(s["running"] == 0 for s in replicas(server, http).values()), "rows freed", server,
             timeout_s=10.0)


def stream_to_end(base_url: str, model: str, out: list[str]) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(trust_env=False, timeout=120.0, headers=AUTH) as own:
            with own.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    out.append(f"error: {response.status_code} {response.read().decode()}")
                    return
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        out.append(f"transport: {exc!r}")
        return
    events = [line[6:] for line in lines]
    if not events or events[-1] != "[DONE]":
        out.append("no [DONE]")
    elif any('"error"' in event for event in events):
        out.append("error:" + next(e for e in events if '"error"' in e))
    else:
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]]
        out.append("ok" if "length" in finishes else f"unfinished: {finishes[-3:]}")


def test_killed_replica_fails_only_its_requests_and_comes_back(server: Server, http: httpx.Client) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=stream_to_end, args=(server.base_url, "tiny-llama", results)) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(s["running"] > 0 for s in replicas(server, http).values()), "both replicas busy", server,
             timeout_s=30.0)
    states = replicas(server, http)
    victim = next(iter(states.values()))
    os.kill(victim["pid"], signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    kinds = Counter(r.split(":")[0] for r in results)
    assert kinds["ok"] >= 1 and kinds["error"] >= 1 and kinds["ok"] + kinds["error"] == 4, results
    assert all("the replica serving this request stopped" in r for r in results if r.startswith("error")), results
    # Ray replaces it; the application serves on both replicas again.
    wait_for(lambda: ready(server, http)["replicas"]["ready"] == 2
             and victim["pid"] not in {s["pid"] for s in replicas(server, http).values()},
             "the replica replaced", server, timeout_s=120.0)
    assert greedy(server, http, "a1")
