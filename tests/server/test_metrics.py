"""GET /metrics, the per-request log line and --log-format, on a tiny random-weight Llama.

A known mix of traffic goes through the HTTP API one request at a time (so slot and cache
events happen in a known order); the exposition must then count exactly that traffic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.cli import build_parser, settings_from_args
from server.logs import TEXT_FORMAT, JsonFormatter, TextFormatter, extra_fields
from server.metrics import EngineCollector, ServerMetrics
from server.sequence import GenerationRequest
from server.service import CompletionService
from tests.adapters.helpers import write_random_adapter
from tests.server.test_api import SERVED_NAME, wait_idle, wait_ready

Json = dict[str, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BASE = SERVED_NAME


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@contextmanager
def serving(tiny_llama_dir: Path, root: Path) -> Iterator[TestClient]:
    adapters = {
        name: str(write_random_adapter(root / name, tiny_llama_dir, rank=4, targets=["q_proj", "v_proj"], seed=seed))
        for name, seed in (("A", 1), ("B", 2))
    }
    # One slot and one CPU-cache entry: every switch between A and B is a load (and an eviction).
    settings = Settings(model=str(tiny_llama_dir), max_num_seqs=4, max_model_len=128, max_loras=1,
                        max_lora_rank=8, max_cpu_loras=1, lora_modules=adapters, data_dir=root / "data")
    app = create_app(lambda metrics: build_service(settings, metrics))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with serving(tiny_llama_dir, tmp_path_factory.mktemp("adapters")) as test_client:
        yield test_client


@pytest.fixture
def fresh_client(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """A server of its own: exact counts must not depend on which tests ran before."""
    with serving(tiny_llama_dir, tmp_path) as test_client:
        yield test_client


def post(client: TestClient, path: str, status: int = 200, **body: Any) -> Json:
    response = client.post(path, json={"temperature": 0, "ignore_eos": True, **body})
    assert response.status_code == status, response.text
    return response.json()


def test_metrics_count_a_known_mix_of_traffic(
    fresh_client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = fresh_client
    service: CompletionService = client.app.state.holder.service  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="loraswap.requests")
    usage: dict[str, list[Json]] = {BASE: [], "A": [], "B": []}

    reference = post(client, "/v1/completions", prompt="Hello, my name is", max_tokens=6)
    text = reference["choices"][0]["text"]
    assert text, "the greedy reference produced no text"
    stopped = post(client, "/v1/completions", prompt="Hello, my name is", max_tokens=6, stop=[text[0]], ignore_eos=False)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    chat = post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    usage[BASE] += [reference["usage"], stopped["usage"], chat["usage"]]
    for model, max_tokens in (("A", 2), ("A", 3), ("B", 4)):  # A: disk + slot load, then hits; B: both evict A
        usage[model].append(post(client, "/v1/completions", model=model, prompt="Once upon", max_tokens=max_tokens)["usage"])
    post(client, "/v1/completions", 404, model="no-such-adapter", prompt="hi", max_tokens=2)
    monkeypatch.setattr(service, "request_timeout", 0.001)
    post(client, "/v1/completions", 408, prompt="A long one", max_tokens=100)
    monkeypatch.undo()
    wait_idle(client)  # the engine drops the timed-out request asynchronously

    records = {r.status: r for r in caplog.records if r.name == "loraswap.requests"}  # type: ignore[attr-defined]
    timed_out = records["timeout"]
    assert len([r for r in caplog.records if r.name == "loraswap.requests"]) == 7
    late = timed_out.completion_tokens  # type: ignore[attr-defined]  # tokens it got before the timeout
    assert 0 <= late < 100

    s = scrape(client)
    assert value(s, "loraswap_requests_total", model=BASE, status="length") == 2
    assert value(s, "loraswap_requests_total", model=BASE, status="stop") == 1
    assert value(s, "loraswap_requests_total", model=BASE, status="timeout") == 1
    assert value(s, "loraswap_requests_total", model="A", status="length") == 2
    assert value(s, "loraswap_requests_total", model="B", status="length") == 1
    assert {labels["model"] for labels in series(s, "loraswap_requests_total")} == {BASE, "A", "B"}  # not the 404
    for model, usages in usage.items():
        extra_gen, extra_prompt = (late, timed_out.prompt_tokens if late else 0) if model == BASE else (0, 0)  # type: ignore[attr-defined]
        assert value(s, "loraswap_generation_tokens_total", model=model) == sum(u["completion_tokens"] for u in usages) + extra_gen
        assert value(s, "loraswap_prompt_tokens_total", model=model) == sum(u["prompt_tokens"] for u in usages) + extra_prompt
    all_usage = [u for usages in usage.values() for u in usages]
    assert value(s, "loraswap_time_to_first_token_seconds_count") == len(all_usage) + (late > 0)
    assert value(s, "loraswap_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in all_usage) + max(late - 1, 0)
    assert value(s, "loraswap_request_latency_seconds_count") == 7

    # Slots: A loaded, A hit, B loaded over A. CPU cache (1 entry, B last added at start): A miss, A hit, B miss.
    assert value(s, "loraswap_lora_slot_loads_total") == 2
    assert value(s, "loraswap_lora_slot_evictions_total") == 1
    assert value(s, "loraswap_lora_slot_hits_total") == 1
    assert value(s, "loraswap_adapter_load_seconds_count", tier="slot") == 2
    assert value(s, "loraswap_adapter_cpu_cache_hits_total") == 1
    assert value(s, "loraswap_adapter_cpu_cache_misses_total") == 2
    assert value(s, "loraswap_adapter_cpu_cache_hit_ratio") == pytest.approx(1 / 3)
    assert value(s, "loraswap_adapter_load_seconds_count", tier="disk") == 2
    assert value(s, "loraswap_lora_slots_capacity") == 1
    assert value(s, "loraswap_lora_slots_resident") == 1
    assert value(s, "loraswap_lora_slot_occupancy") == 1.0

    assert value(s, "loraswap_http_requests_total", route="/v1/completions", code="200") == 5
    assert value(s, "loraswap_http_requests_total", route="/v1/completions", code="404") == 1
    assert value(s, "loraswap_http_requests_total", route="/v1/completions", code="408") == 1
    assert value(s, "loraswap_http_requests_total", route="/v1/chat/completions", code="200") == 1

    assert value(s, "loraswap_model_ready") == 1
    assert value(s, "loraswap_compile_enabled") == 0
    assert value(s, "loraswap_compile_recompilations_total") == 0
    for name in ("vllm:lora_requests_info", "loraswap_lora_requests_info"):
        assert series(s, name) == [{"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}]
        (labels,) = [key for key in s if key[0] == name]
        assert abs(s[labels] - time.time()) < 60
    for prefix in ("loraswap_", "vllm:"):  # vLLM's names: what a gateway's endpoint picker reads
        assert value(s, f"{prefix}num_requests_running") == 0
        assert value(s, f"{prefix}num_requests_waiting") == 0
    assert value(s, "vllm:kv_cache_usage_perc") == value(s, "loraswap_kv_cache_usage")


def test_request_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loraswap.requests")
    body = post(client, "/v1/completions", model="A", prompt="Once upon", max_tokens=3)
    (record,) = [r for r in caplog.records if r.name == "loraswap.requests"]
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "INFO" and line["logger"] == "loraswap.requests" and line["message"] == "request finished"
    assert line["timestamp"].endswith("+00:00")
    assert line["model"] == "A" and line["status"] == "length"
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == 3
    assert isinstance(line["request_id"], str) and line["request_id"]
    assert 0 <= line["ttft_ms"] <= line["latency_ms"]
    text = TextFormatter().format(record)
    assert "loraswap.requests: request finished request_id=" in text and " status=length " in text


def test_json_formatter_keeps_tracebacks_and_uvicorn_access_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), __import__("sys").exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed here" and "ValueError: boom" in line["exception"]
    access = logging.makeLogRecord({"name": "uvicorn.access", "levelname": "INFO", "msg": '%s - "%s %s HTTP/%s" %d',
                                    "args": ("127.0.0.1:5", "GET", "/metrics", "1.1", 200)})
    line = json.loads(JsonFormatter().format(access))
    assert (line["method"], line["path"], line["status_code"]) == ("GET", "/metrics", 200)


def test_log_format_flag_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASWAP_LOG_FORMAT", raising=False)
    assert settings_from_args(build_parser().parse_args(["serve"])).log_format == "text"
    assert settings_from_args(build_parser().parse_args(["serve", "--log-format", "json"])).log_format == "json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])
    monkeypatch.setenv("LORASWAP_LOG_FORMAT", "json")
    assert Settings().log_format == "json"


def test_metrics_need_no_api_key_and_answer_while_loading() -> None:
    release = threading.Event()

    def blocking_factory(_metrics: object) -> CompletionService:
        release.wait(60)
        raise RuntimeError("released by the test")

    app = create_app(blocking_factory, api_key="secret")
    try:
        with TestClient(app) as test_client:
            assert test_client.get("/v1/models").status_code == 401
            s = scrape(test_client)
            assert value(s, "loraswap_model_ready") == 0
            assert value(s, "loraswap_http_requests_total", route="/v1/models", code="401") == 1
            assert not series(s, "loraswap_num_requests_running")
            release.set()
            app.state.holder.join(10)
    finally:
        release.set()


def test_lora_requests_info_describes_the_current_state() -> None:
    slots = {"resident": {"A@0011": 0, "B@0022": 1}, "references": [2, 0, 0], "loads": 2, "evictions": 0,
             "hits": 1, "waits": 3, "waiting_adapters": ["C@0033", "A@0011"]}
    stats: dict[str, object] = {"running": 2, "waiting": 2, "slots": slots,
                                "compile": {"enabled": False, "graphs": 0, "recompilations": 0}}
    collector = EngineCollector(lambda: stats)

    def info() -> list[tuple[dict[str, str], float]]:
        (family,) = [f for f in collector.collect() if f.name == "vllm:lora_requests_info"]
        return [(s.labels, s.value) for s in family.samples]

    ((labels, stamp),) = info()
    assert labels == {"running_lora_adapters": "A", "waiting_lora_adapters": "A,C", "max_lora": "3"}
    assert abs(stamp - time.time()) < 5
    slots.update(references=[0, 0, 0], waiting_adapters=[])
    assert [labels for labels, _ in info()] == [{"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "3"}]


def test_kv_cache_metrics_report_blocks_preemptions_and_prefix_hits_per_model() -> None:
    kv = {"block_size": 16, "blocks_total": 100, "blocks_used": 25, "blocks_cached": 40, "preemptions": 3,
          "prefix_cache_queries": {"base": 1000, "A": 300}, "prefix_cache_hits": {"base": 640}}
    stats: dict[str, object] = {"running": 1, "waiting": 0, "kv_cache": kv,
                                "compile": {"enabled": False, "graphs": 0, "recompilations": 0}}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in EngineCollector(lambda: stats).collect() for s in family.samples}
    assert samples[("loraswap_kv_cache_blocks_total", ())] == 100
    assert samples[("loraswap_kv_cache_blocks_used", ())] == 25
    assert samples[("loraswap_kv_cache_blocks_cached", ())] == 40
    assert samples[("loraswap_kv_cache_usage", ())] == 0.25
    assert samples[("loraswap_num_preemptions_total", ())] == 3
    assert samples[("loraswap_prefix_cache_queries_total", (("model", "A"),))] == 300
    assert samples[("loraswap_prefix_cache_hits_total", (("model", "base"),))] == 640
    assert ("loraswap_prefix_cache_hits_total", (("model", "A"),)) not in samples  # no hit yet: no series


def test_a_cancelled_request_stops_counting_tokens() -> None:
    metrics = ServerMetrics(lambda: None)
    tracker = metrics.track(GenerationRequest("r1", [1, 2, 3], max_tokens=10, adapter="A@0011"), BASE)
    tracker.on_tokens(1, time.monotonic())
    tracker.on_tokens(1, time.monotonic())
    tracker.finish("cancelled")
    tracker.on_tokens(1, time.monotonic())  # emitted before the engine saw the cancel
    tracker.finish("cancelled")  # idempotent
    r = metrics.registry
    assert r.get_sample_value("loraswap_requests_total", {"model": "A", "status": "cancelled"}) == 1
    assert r.get_sample_value("loraswap_generation_tokens_total", {"model": "A"}) == 2
    assert r.get_sample_value("loraswap_prompt_tokens_total", {"model": "A"}) == 3
    assert r.get_sample_value("loraswap_inter_token_latency_seconds_count") == 1
    assert r.get_sample_value("loraswap_model_ready") == 0


def test_private_record_attributes_are_not_fields() -> None:
    """Ray's record factory stamps `_ray_timestamp_ns` on every record of a process that imported
    it; only what a log call passed with `extra=` is printed."""
    record = logging.makeLogRecord({"name": "loraswap.requests", "msg": "request finished", "levelno": logging.INFO,
                                    "levelname": "INFO", "request_id": "r1", "_ray_timestamp_ns": 1})
    assert extra_fields(record) == {"request_id": "r1"}
    assert "_ray" not in TextFormatter(TEXT_FORMAT).format(record)
    assert "_ray_timestamp_ns" not in json.loads(JsonFormatter().format(record))
