"""One HTTP request run through an ASGI app in this process, without a socket: how a Ray Serve
engine replica serves what the ingress forwards to it (server/api/ray_replica.py). The request
travels as a plain `Envelope` (picklable); the response comes back as parts: a whole response
at once, or a head and then its chunks for an event stream, so nothing but an SSE body is ever
seen half-written by the other side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Envelope:
    """The parts of an HTTP request an app reads (ASGI scope fields and the whole body)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None  # the caller as the ingress saw it (loopback checks)
    scheme: str = "http"
    root_path: str = ""

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": self.method, "scheme": self.scheme, "path": self.path,
            "raw_path": self.path.encode("latin-1", "replace"), "query_string": self.query_string,
            "root_path": self.root_path, "headers": list(self.headers), "client": self.client,
            "server": ("loraswap-replica", 0), "state": {},
        }


@dataclass(frozen=True)
class Whole:
    """A complete response."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Head:
    """The start of a streamed (text/event-stream) response; its body follows as bytes parts."""

    status: int
    headers: Headers


def is_event_stream(headers: Headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


async def call_app(app: ASGIApp, envelope: Envelope) -> AsyncIterator[Whole | Head | bytes]:
    """Run `envelope` through `app`: yields one Whole, or a Head then body chunks (bytes) for an
    event stream. Closing the iterator early (the caller went away) cancels the app's task, which
    runs the routes' `finally` blocks: the engine frees the request's rows."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": envelope.body, "more_body": False}
        await asyncio.Event().wait()  # nothing more to read; a disconnect arrives as cancellation
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(envelope.scope(), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        head: Message | None = None
        body: list[bytes] = []
        streaming = False
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing its response
                await task  # re-raises what the app raised
                if head is None:
                    raise RuntimeError("the app sent no response")
                if not streaming:
                    yield Whole(head["status"], _headers(head), b"".join(body))
                return
            if message["type"] == "http.response.start":
                head = message
                streaming = is_event_stream(_headers(head))
                if streaming:
                    yield Head(head["status"], _headers(head))
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if streaming:
                    if chunk:
                        yield chunk
                    if not more:
                        return
                else:
                    body.append(chunk)
                    if not more:
                        assert head is not None
                        yield Whole(head["status"], _headers(head), b"".join(body))
                        return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=10)  # its finally blocks free the engine rows
        if task.done() and not task.cancelled():
            task.exception()  # an error after a complete response (already answered as a 500)


def _headers(message: Message) -> Headers:
    return [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
