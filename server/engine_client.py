"""The narrow interface between the engine core and everything that uses it.

The service, the admin API, the tests and the benchmarks drive an engine through this and
nothing else: token ids and sampling parameters in (`GenerationRequest`), `TokenOutput`s back
through the request's sink, cancels, and slot commands and slot reads that the core runs on its
own thread between steps (futures). A remote replica (one engine per process or per node)
implements the same protocol. Detokenization, stop strings and per-token metrics live on the
service side; the core knows nothing of text.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from server.sequence import FinishReason, GenerationRequest, TokenOutput

# Called by the core with each event of a request, on the core's thread: keep it short and
# thread-safe (the service hands the event to its event loop).
Sink = Callable[[TokenOutput], None]


class EngineClient(Protocol):
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (QueueFullError when the queue is full, EngineStoppedError when
        shutting down); its events go to `sink`, the last one with `finished` set."""
        ...

    def cancel(self, request_id: str, reason: FinishReason = "abort") -> None:
        """End a queued or running request and free its row; a final event still reaches its sink."""
        ...

    def load_adapter(self, key: str, weights: Any, *, pin: bool) -> Future[int]: ...

    def activate_adapter(self, key: str) -> Future[None]: ...

    def unload_adapter(self, key: str, *, retire: bool = True) -> Future[None]: ...

    def adapter_slots(self) -> Future[dict[str, tuple[int, bool]]]:
        """Adapter version key -> (slot, pinned) of every resident version."""
        ...

    def stats(self) -> dict[str, object]:
        """Counters as of the last step (for /ready and /metrics; never waits for a step)."""
        ...

    def health(self) -> str | None:
        """None while the core can take work; otherwise why not."""
        ...

    def stop(self, timeout: float = 10.0) -> None: ...
