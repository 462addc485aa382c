"""The Ray Serve ingress: one OpenAI-compatible HTTP front for N engine replicas. It answers
/health itself, gathers /ready and /metrics from every replica, and forwards everything else,
whole, to one replica tagged with the request's adapter (its `model`) as the multiplexed model
id, so Ray's router prefers a replica that holds it. The replica runs the same app as
`loraswap serve`: routes, bodies, errors and streams are the single process's, byte for byte.

Admin writes go to one replica (the store is shared), then every replica re-reads the store;
slot loads and unloads go to every replica. A replica that dies mid-request ends its requests
with a 503 (an error event in a stream that had begun); Ray replaces it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api.asgi_call import Envelope, Head, Whole
from server.api.auth import bearer_token, is_loopback, token_matches
from server.api.errors import error_body
from server.api.metrics_merge import merge_pages

log = logging.getLogger("loraswap.ray")

ROUTED_BY_MODEL = {"/v1/completions", "/v1/chat/completions"}
EVERY_REPLICA = re.compile(r"/admin/adapters/[^/]+/(load|unload)")  # slot state lives in each replica
STORE_WRITES = re.compile(r"/admin/adapters/[^/]+|/v1/(load|unload)_lora_adapter")
ADMIN_PATHS = re.compile(r"/admin/.*|/v1/(load|unload)_lora_adapter")
MAX_REQUEST_BYTES = 32 * 2**20  # any body but an authorized admin upload (prompts, token ids, schemas)
MAX_ROUTED_BODY = 2**20
MAX_MODEL_ID = 256  # longer `model` values are no adapter name: not worth a routing entry
BROADCAST_TIMEOUT_S = 30.0
REPLICA_GONE = "the replica serving this request stopped; retry"


def multiplexed_id(envelope: Envelope, base_model: str | None) -> str:
    """The adapter a completion request names (its `model`), or "" (no affinity: the base
    model, another route, or a body the replica will refuse anyway)."""
    if envelope.method != "POST" or envelope.path not in ROUTED_BY_MODEL or len(envelope.body) > MAX_ROUTED_BODY:
        return ""  # a body this large is not parsed on the ingress's event loop just to route it
    try:
        body = json.loads(envelope.body)
    except (ValueError, RecursionError):
        return ""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_ID or model == base_model:
        return ""
    return model


def error(status: int, message: str, type_: str = "internal_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_=type_, code=status), status_code=status)


def whole_response(part: Whole) -> Response:
    response = Response(part.body, status_code=part.status)
    response.raw_headers = list(part.headers)  # the replica's, content-length included
    return response


class Ingress:
    """The ingress deployment class (decorated by server/api/ray_serve.py); it holds no model."""

    def __init__(self, engines: DeploymentHandle, *, replicas: int, max_body: int, admin_token: str | None = None,
                 affinity: bool = True) -> None:
        """`max_body`: the largest body of an authorized admin request (an upload); every other
        body is held to MAX_REQUEST_BYTES before it reaches a replica (which checks everything)."""
        self.engines = engines
        self.admin_token = admin_token
        self.affinity = affinity  # False: no multiplexed ids (the benchmark's baseline)
        self.replicas = replicas
        self.max_body = max_body
        self.base_model: str | None = None  # learnt from the first replica that answers

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if path == "/health" and method == "GET":
            return JSONResponse({"status": "ok"})
        if path == "/ready" and method == "GET":
            return await self._ready()
        if path == "/metrics" and method == "GET":
            return await self._metrics()
        limit = self.max_body if self._may_upload(request) else MAX_REQUEST_BYTES
        body = await self._body(request, limit)
        if body is None:
            return error(413, f"the request body is larger than {limit} bytes", "invalid_request_error")
        client = request.scope.get("client")
        envelope = Envelope(
            method=method, path=path, query_string=request.scope.get("query_string", b""),
            headers=list(request.scope.get("headers", [])), body=body,
            client=tuple(client) if client else None, scheme=request.url.scheme,
            root_path=request.scope.get("root_path", ""),
        )
        if method == "POST" and EVERY_REPLICA.fullmatch(path):
            return await self._on_every_replica(envelope)
        response = await self._forward(envelope)
        if method in ("PUT", "POST", "DELETE") and STORE_WRITES.fullmatch(path) and response.status_code < 300:
            await self._refresh_all()
        return response

    def _may_upload(self, request: Request) -> bool:
        """An admin route the replica will accept (its token, or loopback without one): only
        those may send upload-sized bodies, which the ingress holds in memory."""
        if not ADMIN_PATHS.fullmatch(request.url.path):
            return False
        if self.admin_token is None:
            return is_loopback(request.client.host if request.client else None)
        return token_matches(bearer_token(request), self.admin_token)

    async def _body(self, request: Request, limit: int) -> bytes | None:
        """The whole body, or None past `limit` (read no further: a chunked upload too)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _forward(self, envelope: Envelope) -> Response:
        if self.base_model is None:
            await self._learn_base_model()
        model_id = multiplexed_id(envelope, self.base_model) if self.affinity else ""
        handle = self.engines.options(stream=True, multiplexed_model_id=model_id)
        parts: DeploymentResponseGenerator = handle.handle.remote(envelope)
        try:
            first = await parts.__anext__()
        except asyncio.CancelledError:
            parts.cancel()
            raise
        except BackPressureError:  # every replica busy and the queue full, as one process's 429
            return error(429, "too many requests are waiting; retry later", "rate_limit_error")
        except Exception as exc:  # the replica died, or was never reached
            log.warning("forwarding %s %s failed: %s", envelope.method, envelope.path, exc)
            return error(503, REPLICA_GONE)
        if isinstance(first, Whole):
            return whole_response(first)
        assert isinstance(first, Head)
        headers = [(k, v) for k, v in first.headers if k.lower() != b"content-length"]
        response = StreamingResponse(self._rest(parts), status_code=first.status)
        response.raw_headers = headers
        return response

    @staticmethod
    async def _rest(parts: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
        """The stream's remaining chunks; the client going away cancels the replica's request
        (which frees its rows there)."""
        try:
            async for chunk in parts:
                yield chunk
        except Exception as exc:
            log.warning("a replica failed mid-stream: %s", exc)
            payload = json.dumps(error_body(REPLICA_GONE, type_="internal_error", code=503))
            yield f"data: {payload}\n\ndata: [DONE]\n\n".encode()
        finally:
            parts.cancel()

    async def _learn_base_model(self) -> None:
        try:
            described = await self.engines.describe.remote()
            self.base_model = str(described["model"])
        except Exception as exc:  # no replica yet: route this request without affinity
            log.debug("no replica described itself yet: %s", exc)

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Each live replica's result (exceptions included, in place of results)."""
        return await self.engines.broadcast(method, *args).results_async(
            timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
        )

    async def _replies(self, envelope: Envelope) -> dict[str, Whole]:
        return {r[0]: r[1] for r in await self._broadcast("call", envelope) if isinstance(r, tuple)}

    async def _ready(self) -> JSONResponse:
        """200 while at least one replica is ready; each replica's own /ready body under its id."""
        replies, described = await asyncio.gather(self._replies(Envelope("GET", "/ready")), self._broadcast("describe"))
        who = {d["replica"]: d for d in described if isinstance(d, dict)}
        states = {rid: {**who.get(rid, {}), **json.loads(part.body)} for rid, part in replies.items()}
        if self.base_model is None and who:
            self.base_model = str(next(iter(who.values()))["model"])
        ready = sum(part.status == 200 for part in replies.values())
        body = {
            "status": "ready" if ready else "unavailable", "model": self.base_model,
            "replicas": {"configured": self.replicas, "answering": len(replies), "ready": ready},
            "replica_status": states,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _metrics(self) -> Response:
        replies = await self._replies(Envelope("GET", "/metrics"))
        pages = {rid: part.body.decode() for rid, part in replies.items() if part.status == 200}
        return Response(merge_pages(pages), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _on_every_replica(self, envelope: Envelope) -> Response:
        """Slot loads/unloads: every replica's answer; the first failure if any failed."""
        replies = await self._replies(envelope)
        if not replies:
            return error(503, "no replica is answering")
        failed = [part for part in replies.values() if part.status >= 300]
        chosen = failed[0] if failed else next(iter(replies.values()))
        response = whole_response(chosen)
        response.headers["x-loraswap-replicas"] = str(len(replies))
        return response

    async def _refresh_all(self) -> None:
        """Every replica follows the store at once (each also would on its next request)."""
        for result in await self._broadcast("refresh"):
            if isinstance(result, BaseException):
                log.warning("a replica did not refresh its catalog: %s", result)
