"""The engine core's inbox: how other threads reach the engine thread.

Submissions, cancels and commands (slot changes, slot reads) are queued here and taken by the
engine thread between steps, in order; nothing else crosses threads. The inbox also bounds the
requests submitted and not yet admitted (QueueFullError beyond `max_waiting`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from server.engine_client import Sink
from server.errors import QueueFullError
from server.sequence import FinishReason, GenerationRequest


@dataclass(frozen=True)
class Submit:
    request: GenerationRequest
    sink: Sink


@dataclass(frozen=True)
class Cancel:
    request_id: str
    reason: FinishReason


@dataclass(frozen=True)
class Call:
    """Work that must run on the engine thread between steps (slot commands and reads)."""

    fn: Callable[[], Any]
    future: Future[Any]

    def run(self) -> None:
        """Run fn() (on the engine thread); its result or exception lands in the future."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn()
        except Exception as exc:  # reported to the caller, the engine keeps going
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


Item = Submit | Cancel | Call | None  # None: wake up (the engine is stopping)


class Inbox:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._pending = 0  # submitted and not yet admitted or cancelled
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        with self._lock:
            if self._pending >= self.max_waiting:
                raise QueueFullError(f"{self._pending} requests are already waiting; retry shortly")
            self._pending += 1
        self._queue.put(Submit(request, sink))

    def left_queue(self) -> None:
        """A submitted request was admitted, cancelled or failed before admission."""
        with self._lock:
            self._pending -= 1

    def rejoin(self) -> None:
        """A preempted request is queued again (it was accepted once: no limit applies)."""
        with self._lock:
            self._pending += 1

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        self._queue.put(Cancel(request_id, reason))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put(Call(fn, future))
        return future

    def wake(self) -> None:
        self._queue.put(None)

    def take(self, *, block: bool) -> list[Item]:
        """Everything queued, in order; with `block`, wait up to 0.5 s for the first item."""
        items: list[Item] = []
        try:
            items.append(self._queue.get(timeout=0.5) if block else self._queue.get_nowait())
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            return items
