"""The Ray Serve ingress: one OpenAI-compatible HTTP front for N engine replicas. It answers
/health itself, gathers /ready and /metrics from every replica, and forwards everything else,
whole, to one replica tagged with the request's adapter (its `model`, when it names a stored
adapter) as the multiplexed model id, so Ray's router prefers a replica that holds it. The
replica runs the same app as `loraswap serve`: routes, bodies, errors and streams are the single
process's, byte for byte.

Keys are checked here first (the replica checks them again), so an unauthorized request costs
no body, queue place or replica. Admin writes go to one replica (the store is shared), then
every replica re-reads the store; slot loads and unloads go to every replica. A replica that
dies mid-request ends its requests with a 503 (an error event in a stream that had begun); Ray
replaces it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.adapter_mix import is_mix
from server.api.asgi_call import Envelope, Head, Whole
from server.api.auth import bearer_token, check_admin, check_api_key
from server.api.errors import error_body, error_response
from server.api.ray_gather import Gatherer, whole_response
from server.errors import LoraswapError

log = logging.getLogger("loraswap.ray")

ROUTED_BY_MODEL = {"/v1/completions", "/v1/chat/completions"}
EVERY_REPLICA = re.compile(r"/admin/adapters/[^/]+/(load|unload)")  # slot state lives in each replica
STORE_WRITES = re.compile(r"/admin/adapters/[^/]+|/v1/(load|unload)_lora_adapter")
ADMIN_PATHS = re.compile(r"/admin/.*|/v1/(load|unload)_lora_adapter")
API_KEY_PATHS = re.compile(r"/v1/.*|/tokenize|/detokenize|/tokenizer_info")  # the app's require_api_key routes
MAX_REQUEST_BYTES = 32 * 2**20  # any body but an admin upload (prompts, token ids, schemas)
MAX_ROUTED_BODY = 2**20  # larger bodies are not parsed on the event loop just to route them
MAX_MODEL_ID = 256
KNOWN_TTL_S = 1.0  # how stale the set of adapter names may be when an untagged name shows up
REPLICA_GONE = "the replica serving this request stopped; retry"


def requested_model(envelope: Envelope, route: str) -> str:
    """The single adapter or model a completion request names in `model`, or "" (another
    route, a mix, a body the replica will refuse anyway)."""
    if envelope.method != "POST" or route not in ROUTED_BY_MODEL or len(envelope.body) > MAX_ROUTED_BODY:
        return ""
    try:
        body = json.loads(envelope.body)
    except (ValueError, RecursionError):
        return ""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_ID or is_mix(model) or body.get("adapters"):
        return ""
    return model


def route_path(scope: Scope) -> str:
    """The path below --root-path (uvicorn puts the prefix in `path` too): what routes match."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root):] or "/" if root and path.startswith(root) else path


def error(status: int, message: str, type_: str = "internal_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_=type_, code=status), status_code=status)


class RelayedStream(StreamingResponse):
    """A replica's event stream; however this response ends (client gone, never started, a send
    failing), the replica's request is cancelled, which frees its rows there."""

    def __init__(self, parts: DeploymentResponseGenerator, head: Head) -> None:
        super().__init__(self._relay(parts), status_code=head.status)
        self.raw_headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        self.parts = parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.parts.cancel()

    @staticmethod
    async def _relay(parts: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
        try:
            async for chunk in parts:
                yield chunk
        except Exception as exc:
            gone = isinstance(exc, RayActorError)
            log.warning("a replica's stream failed: %r", exc)
            message = REPLICA_GONE if gone else "the request failed on its replica"
            payload = json.dumps(error_body(message, type_="internal_error", code=503 if gone else 500))
            yield f"data: {payload}\n\ndata: [DONE]\n\n".encode()


class Ingress:
    """The ingress deployment class (decorated by server/api/ray_serve.py); it holds no model."""

    def __init__(self, engines: DeploymentHandle, *, replicas: int, max_body: int, admin_token: str | None = None,
                 api_key: str | None = None, affinity: bool = True) -> None:
        """`max_body`: the largest body of an authorized admin request (an upload); every other
        body is held to MAX_REQUEST_BYTES before it reaches a replica (which checks everything)."""
        self.engines = engines
        self.gather = Gatherer(engines, replicas)
        self.admin_token = admin_token
        self.api_key = api_key
        self.max_body = max_body
        self.affinity = affinity  # False: no multiplexed ids (the benchmark's baseline)
        self.adapters: frozenset[str] = frozenset()  # the stored adapters' names: the only ids tagged
        self.adapters_at = 0.0

    async def __call__(self, request: Request) -> Response:
        route, method = route_path(request.scope), request.method
        if route == "/health" and method == "GET":
            return JSONResponse({"status": "ok"})
        if route == "/ready" and method == "GET":
            return await self.gather.ready()
        if route == "/metrics" and method == "GET":
            return await self.gather.metrics()
        admin = bool(ADMIN_PATHS.fullmatch(route))
        try:
            if admin:
                check_admin(bearer_token(request), request.client.host if request.client else None, self.admin_token)
            elif API_KEY_PATHS.fullmatch(route):
                check_api_key(bearer_token(request), self.api_key)
        except LoraswapError as exc:
            return error_response(exc)
        limit = self.max_body if admin else MAX_REQUEST_BYTES
        body = await self._body(request, limit)
        if body is None:
            return error(413, f"the request body is larger than {limit} bytes", "invalid_request_error")
        client = request.scope.get("client")
        envelope = Envelope(
            method=method, path=request.scope["path"], query_string=request.scope.get("query_string", b""),
            headers=list(request.scope.get("headers", [])), body=body,
            client=tuple(client) if client else None, scheme=request.url.scheme,
            root_path=request.scope.get("root_path", ""),
        )
        if method == "POST" and EVERY_REPLICA.fullmatch(route):
            return await self.gather.on_every_replica(envelope)
        response = await self._forward(envelope, await self._affinity(envelope, route))
        if method in ("PUT", "POST", "DELETE") and STORE_WRITES.fullmatch(route) and response.status_code < 300:
            await self.gather.refresh_all()
            self.adapters_at = 0.0  # the names changed
        return response

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

    async def _affinity(self, envelope: Envelope, route: str) -> str:
        """The multiplexed id: the request's adapter when it is a stored one, else "" (the base
        model, unknown names and mixes would only evict real adapters from a replica's set, and
        every distinct id costs the router memory)."""
        model = requested_model(envelope, route) if self.affinity else ""
        if not model:
            return ""
        if model not in self.adapters and time.monotonic() - self.adapters_at > KNOWN_TTL_S:
            self.adapters_at = time.monotonic()
            try:  # one replica answers for all: they share the store
                self.adapters = frozenset((await self.engines.describe.remote())["adapters"])
            except Exception as exc:
                log.debug("no replica described its adapters: %r", exc)
        return model if model in self.adapters else ""

    async def _forward(self, envelope: Envelope, model_id: str) -> Response:
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
            log.warning("forwarding %s %s failed: %r", envelope.method, envelope.path, exc)
            return error(503, REPLICA_GONE)
        if isinstance(first, Whole):
            return whole_response(first)
        assert isinstance(first, Head)
        return RelayedStream(parts, first)

