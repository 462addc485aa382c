"""The Ray application's pure parts, without Ray: which requests get an adapter affinity, how
replica pages merge into one /metrics, and how a request runs through an app in process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.api.asgi_call import Envelope, Head, Whole, call_app
from server.api.metrics_merge import merge_pages
from server.api.ray_ingress import MAX_ROUTED_BODY, requested_model, route_path


def post(path: str, body: object) -> Envelope:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Envelope("POST", path, body=raw)


def affinity(envelope: Envelope) -> str:
    return requested_model(envelope, envelope.path)


def test_the_model_a_completion_names_is_its_affinity_candidate() -> None:
    assert affinity(post("/v1/completions", {"model": "french", "prompt": "x"})) == "french"
    assert affinity(post("/v1/chat/completions", {"model": "pirate", "messages": []})) == "pirate"
    # Below --root-path, routes match on the path under the prefix.
    assert route_path({"path": "/lora/v1/completions", "root_path": "/lora"}) == "/v1/completions"
    assert route_path({"path": "/lora", "root_path": "/lora"}) == "/"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"


def test_no_candidate_for_mixes_other_routes_and_bad_bodies() -> None:
    cases = [
        post("/tokenize", {"model": "french"}),  # not a completion
        Envelope("GET", "/v1/completions"),
        post("/v1/completions", {"model": "french:0.5+pirate"}),  # a mix: several adapters
        post("/v1/completions", {"model": "french", "adapters": [{"name": "pirate", "weight": 1}]}),
        post("/v1/completions", b"{not json"),
        post("/v1/completions", b"[" * 100_000 + b"]" * 100_000),  # too deep for json: refused by the replica
        post("/v1/completions", ["french"]),
        post("/v1/completions", {"model": 5}),
        post("/v1/completions", {"model": ""}),
        post("/v1/completions", {"model": "x" * 257}),
        post("/v1/completions", {"model": "french", "prompt": "x" * MAX_ROUTED_BODY}),  # not parsed to route
    ]
    for envelope in cases:
        assert affinity(envelope) == "", envelope.body[:60]


PAGE = """# HELP loraswap_requests_total Finished requests.
# TYPE loraswap_requests_total counter
loraswap_requests_total{model="a",status="stop"} 3.0
# HELP vllm:lora_requests_info Running and waiting LoRA adapters.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",waiting_lora_adapters=""} 1.7e9
# HELP lat Latency.
# TYPE lat histogram
lat_bucket{le="1.0"} 1.0
lat_bucket{le="+Inf"} 2.0
lat_count 2.0
lat_sum 3.5
"""


def test_replica_pages_merge_with_a_replica_label() -> None:
    merged = merge_pages({"r1": PAGE, "r2": PAGE.replace("3.0", "5.0").replace('replica="', 'x="')}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = families["loraswap_requests"].samples
    assert sorted((s.labels["replica"], s.value) for s in requests) == [("r1", 3.0), ("r2", 5.0)]
    info = families["vllm:lora_requests_info"].samples
    assert {s.labels["replica"] for s in info} == {"r1", "r2"} and info[0].labels["running_lora_adapters"] == "a"
    assert len(families["lat"].samples) == 8
    assert merged.count("# TYPE lat histogram") == 1
    assert merge_pages({}) == b""


async def _json(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"echo": body, "client": request.client.host if request.client else None}, status_code=201)


closed: list[str] = []


async def _events(request: Request) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        try:
            for i in range(1000):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append("stream")

    return StreamingResponse(gen(), media_type="text/event-stream")


async def _boom(request: Request) -> JSONResponse:
    raise RuntimeError("boom")


APP = Starlette(routes=[Route("/json", _json, methods=["POST"]), Route("/events", _events), Route("/boom", _boom)])


async def _collect(envelope: Envelope, limit: int | None = None) -> list[object]:
    parts: list[object] = []
    stream = call_app(APP, envelope)
    async for part in stream:
        parts.append(part)
        if limit is not None and len(parts) >= limit:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    return parts


def test_a_whole_response_comes_back_at_once() -> None:
    envelope = Envelope("POST", "/json", headers=[(b"content-type", b"application/json")], body=b'{"a": 1}',
                        client=("127.0.0.1", 5000))
    (part,) = asyncio.run(_collect(envelope))
    assert isinstance(part, Whole) and part.status == 201
    assert json.loads(part.body) == {"echo": {"a": 1}, "client": "127.0.0.1"}
    assert (b"content-length", str(len(part.body)).encode()) in part.headers


def test_an_event_stream_comes_back_as_a_head_then_chunks_and_closing_cancels_it() -> None:
    closed.clear()
    parts = asyncio.run(_collect(Envelope("GET", "/events"), limit=4))
    assert isinstance(parts[0], Head) and parts[0].status == 200
    assert parts[1:] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert closed == ["stream"]  # the app's generator was closed: a route's finally runs


def test_an_app_error_is_a_500_response() -> None:
    (part,) = asyncio.run(_collect(Envelope("GET", "/boom")))
    assert isinstance(part, Whole) and part.status == 500
