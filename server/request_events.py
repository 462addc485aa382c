"""The events of one submitted request, as the service hands them to a route: the engine's token
events turned into text on the event loop (server/text_stream.py), a stop string turned into a
cancel, the request's timeout, and a cancel when the reader goes away. No tensors and no HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine_client import EngineClient
from server.errors import RequestTimeoutError
from server.metrics import RequestTracker, finish_status
from server.sequence import GenerationRequest, TokenOutput
from server.text_stream import RequestOutput, TextStream


class RequestEvents:
    """The events of one submitted request, read once with `async for`. The core's token events
    arrive through `deliver`, on the event loop. `close()` is idempotent and cancels the engine
    request unless it finished: a generator's `finally` alone would not run for a stream that
    was never started (a client gone before the body was sent)."""

    def __init__(self, engine: EngineClient, request: GenerationRequest, text: TextStream,
                 tracker: RequestTracker | None, timeout: float | None) -> None:
        self.engine = engine
        self.request = request
        self.text = text
        self.tracker = tracker
        self.timeout = timeout
        self.queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()  # None: the timeout fired
        self.timer: asyncio.TimerHandle | None = None
        self._finished = False  # the reader saw the last event
        self._timed_out = False
        self._closed = False

    def deliver(self, out: TokenOutput) -> None:
        """One core event (event loop): metrics, text, stop strings. Once the text has finished
        (a stop string, or the core's last event), later core events are dropped."""
        if self.text.finished or self._closed:
            return
        event = self.text.feed(out)
        if self.tracker is not None:  # the tokens the client gets (none past a stop string)
            self.tracker.on_tokens(len(event.token_ids), out.time)
        if self.text.stopped_by_string:  # the core does not know: end it there too
            self.engine.cancel(self.request.request_id, "stop")
        self.queue.put_nowait(event)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self._finished:
                event = await self.queue.get()
                if event is None:
                    self._timed_out = True
                    raise RequestTimeoutError(
                        f"the request ran longer than the server's limit of {self.timeout:g} s "
                        "(--request-timeout); ask for fewer tokens"
                    )
                self._finished = event.finished
                if self._finished and self.tracker is not None:  # counted before the response ends
                    self.tracker.finish(finish_status(event.finish_reason))
                yield event
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.timer is not None:
            self.timer.cancel()
        if not self._finished:  # the client went away, the task was cancelled or the timeout fired
            if not self.text.finished:  # else the core has finished it or been told to
                self.engine.cancel(self.request.request_id)
            if self.tracker is not None:
                self.tracker.finish("timeout" if self._timed_out else "cancelled")
