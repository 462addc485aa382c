"""A submitted request's event stream: closing it cancels the engine request whether or not it
was ever read (a client can leave before the response body starts), exactly once, and never
after the request finished."""

from __future__ import annotations

import asyncio

from server.sampling import SamplingParams
from server.sequence import GenerationRequest, TokenOutput
from server.request_events import RequestEvents
from server.text_stream import RequestOutput, TextStream


class RecordingEngine:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        self.cancelled.append(request_id if reason == "abort" else f"{request_id}:{reason}")


class Letters:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def stream(engine: RecordingEngine, stop: tuple[str, ...] = ()) -> RequestEvents:
    request = GenerationRequest("r1", [1, 2, 3], max_tokens=4, sampling=SamplingParams(temperature=0))
    return RequestEvents(engine, request, TextStream(Letters(), [], stop), None, None)  # type: ignore[arg-type]


def test_closing_an_unread_stream_cancels_its_request_once() -> None:
    engine = RecordingEngine()
    events = stream(engine)
    events.close()
    events.close()
    assert engine.cancelled == ["r1"]


def test_a_finished_stream_cancels_nothing() -> None:
    async def read() -> list[RequestOutput]:
        events = stream(engine)
        events.queue.put_nowait(RequestOutput("r1", "hi", [5], finished=True, finish_reason="length"))
        got = [event async for event in events]
        events.close()
        return got

    engine = RecordingEngine()
    assert [e.finish_reason for e in asyncio.run(read())] == ["length"]
    assert engine.cancelled == []


def test_leaving_mid_stream_cancels_the_request() -> None:
    async def read_one() -> None:
        events = stream(engine)
        events.queue.put_nowait(RequestOutput("r1", "h", [5], finished=False))
        iterator = aiter(events)
        await anext(iterator)
        await iterator.aclose()  # what a client that disconnects leaves behind

    engine = RecordingEngine()
    asyncio.run(read_one())
    assert engine.cancelled == ["r1"]


def test_a_stop_string_cancels_the_core_request_once_and_drops_what_follows() -> None:
    async def feed() -> list[RequestOutput]:
        events = stream(engine, stop=("b",))
        for i, ch in enumerate("abcd", 1):  # the core goes on until it hears of the cancel
            events.deliver(TokenOutput("r1", [ord(ch)], completion_tokens=i))
        events.deliver(TokenOutput("r1", [], finished=True, finish_reason="stop", completion_tokens=4))
        got = [event async for event in events]
        events.close()
        return got

    engine = RecordingEngine()
    got = asyncio.run(feed())
    assert [(e.text, e.finished, e.finish_reason) for e in got] == [("a", False, None), ("", True, "stop")]
    assert got[-1].completion_tokens == 2
    assert engine.cancelled == ["r1:stop"]
