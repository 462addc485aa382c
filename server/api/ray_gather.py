"""What the Ray ingress asks every engine replica: /ready and /metrics gathered into one answer
(each cached for a second and shared by concurrent callers, so a scraper or a load balancer
cannot fan out N calls per request), slot loads/unloads run on all, and a catalog refresh
after a store write. A replica that fails or times out is counted, never a 500 here."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response

from server.api.asgi_call import Envelope, Whole
from server.api.errors import error_body
from server.api.metrics_merge import merge_pages

log = logging.getLogger("loraswap.ray")

BROADCAST_TIMEOUT_S = 30.0
CACHE_S = 1.0


class Gatherer:
    def __init__(self, engines: DeploymentHandle, replicas: int) -> None:
        self.engines = engines
        self.replicas = replicas  # configured
        self._cached: dict[str, tuple[float, Response]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Each live replica's result or exception; [] when none answered (none running, or
        the whole call timed out)."""
        try:
            return await self.engines.broadcast(method, *args).results_async(
                timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
            )
        except Exception as exc:
            log.warning("broadcast %s failed: %r", method, exc)
            return []

    async def _replies(self, envelope: Envelope) -> tuple[dict[str, Whole], int]:
        """({replica id: its whole answer}, how many replicas failed to answer)."""
        results = await self._broadcast("call", envelope)
        replies = {r[0]: r[1] for r in results if isinstance(r, tuple)}
        return replies, len(results) - len(replies)

    async def _cached_or(self, key: str, make: Callable[[], Awaitable[Response]]) -> Response:
        async with self._locks.setdefault(key, asyncio.Lock()):  # one gathering in flight per kind
            hit = self._cached.get(key)
            if hit is not None and time.monotonic() - hit[0] < CACHE_S:
                return hit[1]
            response = await make()
            self._cached[key] = (time.monotonic(), response)
            return response

    async def ready(self) -> Response:
        return await self._cached_or("ready", self._ready)

    async def metrics(self) -> Response:
        return await self._cached_or("metrics", self._metrics)

    async def _ready(self) -> JSONResponse:
        """200 while at least one replica is ready; each replica's own /ready body (with its
        pid and node) under its id."""
        (replies, _), described = await asyncio.gather(self._replies(Envelope("GET", "/ready")),
                                                       self._broadcast("describe"))
        who = {d["replica"]: d for d in described if isinstance(d, dict)}
        states: dict[str, Any] = {}
        for rid, part in replies.items():
            try:
                body = json.loads(part.body)
            except ValueError:
                body = {"status": "unreadable", "http_status": part.status}
            facts = {k: v for k, v in who.get(rid, {}).items() if k != "adapters"}
            states[rid] = {**facts, **body} if isinstance(body, dict) else facts
        ready = sum(part.status == 200 for part in replies.values())
        model = next((d.get("model") for d in who.values()), None)
        body = {
            "status": "ready" if ready else "unavailable", "model": model,
            "replicas": {"configured": self.replicas, "answering": len(replies), "ready": ready},
            "replica_status": states,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _metrics(self) -> Response:
        replies, _ = await self._replies(Envelope("GET", "/metrics"))
        pages = {rid: part.body.decode(errors="replace") for rid, part in replies.items() if part.status == 200}
        return Response(merge_pages(pages), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def on_every_replica(self, envelope: Envelope) -> Response:
        """Slot loads/unloads: the first failure if any replica failed or did not answer, else
        the first answer; `x-loraswap-replicas` says how many answered."""
        replies, missing = await self._replies(envelope)
        failed = [part for part in replies.values() if part.status >= 300]
        if failed:
            chosen: Response = whole_response(failed[0])
        elif missing or not replies:
            chosen = JSONResponse(
                error_body(f"{missing} of {missing + len(replies)} replicas did not answer; the others did it",
                           type_="internal_error", code=503), status_code=503)
        else:
            chosen = whole_response(next(iter(replies.values())))
        chosen.headers["x-loraswap-replicas"] = str(len(replies))
        return chosen

    async def refresh_all(self) -> None:
        """Every replica follows the store at once (each also would on its next request)."""
        for result in await self._broadcast("refresh"):
            if isinstance(result, BaseException):
                log.warning("a replica did not refresh its catalog: %r", result)


def whole_response(part: Whole) -> Response:
    """A replica's whole answer as the ingress's response, its headers as they were."""
    response = Response(part.body, status_code=part.status)
    response.raw_headers = list(part.headers)  # content-length included
    return response
