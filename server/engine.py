"""The engine core: admits requests by the KV memory they need, runs one forward per step, emits
token ids (the scheduling itself is server/scheduler.py).

Runs on its own thread so the HTTP event loop never waits on tensor work. Each iteration takes
new requests, cancellations and commands from the inbox, then runs one scheduler step. Its client
interface is narrow (server/engine_client.py): token ids and sampling parameters in,
`TokenOutput`s out through each request's sink (called on this thread; the service bridges it
into asyncio), cancels with a reason, and slot commands and slot reads that run on this thread
between steps. Text, stop strings and per-token metrics are the service's (server/service.py,
server/text_stream.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from server.engine_client import Sink
from server.engine_inbox import Call, Cancel, Submit
from server.engine_view import EngineSnapshot
from server.errors import EngineStoppedError
from server.scheduler import Scheduler, Waiting
from server.sequence import FinishReason, GenerationRequest, Sequence

log = logging.getLogger("loraswap.engine")

STALL_S = 120.0  # a step this long with work pending means the engine is stuck


class Engine(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The Scheduler's arguments (server/scheduler.py)."""
        super().__init__(*args, **kwargs)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._heartbeat = time.monotonic()  # end of the engine loop's last iteration
        self._snapshot = EngineSnapshot()
        self._publish()

    # ---- public, thread-safe -------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        if self._stopping.is_set():
            raise EngineStoppedError("the engine is shutting down")
        if request.uses and self.slot_table is None:
            raise ValueError("this engine has no LoRA slots")
        self._inbox.submit(request, sink)

    def cancel(self, request_id: str, reason: FinishReason = "abort") -> None:
        """End a request (queued or running) and free its row. `reason`: how it counts; the
        service cancels with "stop" when it finds a stop string in the text."""
        self._inbox.cancel(request_id, reason)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn() on the engine thread between two steps; its result or exception lands in the
        future (the slot tensors and the slot table are only ever touched from that thread)."""
        return self._inbox.call(fn)

    def load_adapter(self, key: str, weights: Any, *, pin: bool) -> Future[int]:
        """Write an adapter version into a slot now (if not resident) and pin or unpin it."""
        return self.call(lambda: self._need_slots().load_now(key, weights, pin))

    def activate_adapter(self, key: str) -> Future[None]:
        """A published (current) version: undo an earlier unload of the same key."""
        return self.call(lambda: self.slots.revive(key) if self.slots is not None else None)

    def unload_adapter(self, key: str, *, retire: bool = True) -> Future[None]:
        """Take an adapter version out of its slot; rows still using it finish on it first.
        `retire=False` for the current version (see SlotTable.unload)."""
        def unload() -> None:
            if retire:  # that version's prefix blocks are never to be found again
                self.blocks.forget_adapter(key)
            if self.slots is not None:
                self.slots.unload_now(key, retire)

        return self.call(unload)

    def adapter_slots(self) -> Future[dict[str, tuple[int, bool]]]:
        """Adapter version key -> (slot, pinned) of every resident version, read on the engine
        thread between two steps."""
        return self.call(lambda: {} if self.slots is None else self.slots.states())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraswap-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, object]:
        """Scheduler counters for /ready and /metrics: the snapshot of the last step (never the
        engine's live state), plus the requests submitted and not yet admitted."""
        return {"waiting": self._inbox.pending, **self._snapshot.as_dict()}

    def _publish(self) -> None:
        """Replace the snapshot other threads read (engine thread only)."""
        slots = wait = None
        if self.slots is not None:
            slots = self.slots.view(key for w in self._waiting for key in w.seq.request.adapter_keys)
            wait = replace(self.wait_stats)
        runner = self.runner
        self._snapshot = EngineSnapshot(
            running=len(self._running), generated_tokens=self.generated_tokens, finished=dict(self.finished),
            compile={"enabled": runner.compiled, "graphs": runner.compile_counter.graphs,
                     "recompilations": runner.recompilations},
            slots=slots, wait=wait, kv=self.blocks.stats(),
        )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            idle = not self._running and not self._waiting
            self._drain_inbox(block=idle)
            try:
                self.step()
            except Exception as exc:  # keep serving: fail what was in flight, not the process
                log.exception("engine step failed")
                self._fail_all(f"internal error: {exc}")
            self._check_rows()
            self._heartbeat = time.monotonic()
        self._fail_all("server shutting down")

    def health(self) -> str | None:
        """None while the engine can take work; otherwise why it cannot (GET /ready says 503)."""
        if self._stopping.is_set():
            return "the engine is shutting down"
        if self._thread is not None and not self._thread.is_alive():
            return "the engine thread has stopped"
        busy = self._snapshot.running > 0 or self._inbox.pending > 0
        if busy and time.monotonic() - self._heartbeat > STALL_S:
            return f"the engine has not finished a step in {STALL_S:.0f} s"
        return self._problem

    def _drain_inbox(self, *, block: bool) -> None:
        for item in self._inbox.take(block=block):
            if isinstance(item, Submit):
                seq = Sequence(item.request, eos_ids=self.eos_ids, max_len=self.max_len)
                self._waiting.append(Waiting(seq, item.sink))
            elif isinstance(item, Cancel):
                self._cancel(item.request_id, item.reason)
            elif isinstance(item, Call):
                item.run()
                self._publish()  # the caller's next read sees what its command did

    def run_until_idle(self) -> None:
        """Drain the inbox and step until nothing is left (synchronous use, tests, benchmarks)."""
        self._drain_inbox(block=False)
        while self._running or self._waiting:
            self.step()
            self._drain_inbox(block=False)

