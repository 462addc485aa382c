"""The engine core: admits requests into cache rows, runs one forward per step, emits token ids.

Runs on its own thread so the HTTP event loop never waits on tensor work. Each iteration:
1. take new requests and cancellations from the inbox;
2. give waiting requests free rows (lowest row first, which keeps decode batches compact);
3. schedule the step: one decode token for every row that has finished its prefill, plus whole
   prompt chunks, oldest admitted request first, while they fit `max_num_batched_tokens`;
4. run them as one forward (server/runner.py) and hand each sampled token to its request.
Requests join and leave between iterations, so a long prompt never stalls running streams for
more than one chunk. Its client interface is narrow (server/engine_client.py): token ids and
sampling parameters in, `TokenOutput`s out through each request's sink (called on this thread;
the service bridges it into asyncio), cancels with a reason, and slot commands and slot reads
that run on this thread between steps. Text, stop strings and per-token metrics are the
service's (server/service.py, server/text_stream.py).
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from adapters.slot_table import SlotGrant, SlotTable
from server.engine_client import Sink
from server.engine_inbox import Call, Cancel, Inbox, Submit
from server.engine_slots import EngineSlots
from server.engine_view import EngineSnapshot
from server.errors import EngineStoppedError
from server.forward_batch import PromptChunk
from server.runner import NON_FINITE, ModelRunner
from server.scheduling import WaitStats, schedule_chunks
from server.sequence import FinishReason, GenerationRequest, Sequence, TokenOutput

log = logging.getLogger("loraswap.engine")

STALL_S = 120.0  # a step this long with work pending means the engine is stuck


@dataclass
class _Waiting:
    seq: Sequence
    sink: Sink
    since: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        *,
        eos_ids: frozenset[int],
        prefill_chunk: int = 512,
        max_num_batched_tokens: int | None = None,
        long_prefill_token_threshold: int = 0,
        slot_table: SlotTable | None = None,
        adapter_weights: Callable[[str], Any] | None = None,
        max_waiting: int = 1024,
        max_wait_s: float = 2.0,
        on_slot_load: Callable[[float], None] | None = None,
    ) -> None:
        """`slot_table` enables adapter requests: a request's adapter (its `adapter_weights`, or
        else `adapter_weights(key)`) is written into a slot on admission when it is not resident.
        `max_waiting` bounds the queue (QueueFullError beyond it). A request that has waited
        `max_wait_s` for a slot stops everyone behind it from being admitted until it gets one
        (no starvation). `on_slot_load(seconds)` hears how long each slot write took."""
        self.runner = runner
        self.eos_ids = eos_ids
        self.prefill_chunk = prefill_chunk
        # Tokens one step may carry (decode tokens and prompt chunks); default: one chunk. A
        # chunk never exceeds the budget, so a step goes over it by at most the decode tokens.
        self.max_num_batched_tokens = max_num_batched_tokens or prefill_chunk
        self.chunk_size = min(prefill_chunk, self.max_num_batched_tokens)
        # Prompts longer than this put one chunk in all into a step while rows decode (0: off).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_rows = runner.max_rows
        self.max_len = runner.max_len
        self._inbox = Inbox(max_waiting)
        self.slots = None if slot_table is None else EngineSlots(slot_table, runner, on_slot_load)
        self.adapter_weights = adapter_weights
        self.max_wait_s = max_wait_s
        self.wait_stats = WaitStats()
        self._waiting: deque[_Waiting] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._running: dict[str, tuple[Sequence, Sink]] = {}  # admitted, by request id
        self._free_rows = list(range(self.max_rows))  # a heap: the lowest free row goes first
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # How requests ended in the engine ("abort": cancelled; "stop" includes the stop strings
        # the service found and cancelled with that reason), and the tokens it sampled.
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.generated_tokens = 0
        self._heartbeat = time.monotonic()  # end of the engine loop's last iteration
        self._problem: str | None = None  # set by _check_rows
        self._snapshot = EngineSnapshot()
        self._publish()

    # ---- public, thread-safe -------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        if self._stopping.is_set():
            raise EngineStoppedError("the engine is shutting down")
        if request.adapter is not None and self.slot_table is None:
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
        return self.call(lambda: self.slot_table.revive(key) if self.slot_table is not None else None)

    def unload_adapter(self, key: str, *, retire: bool = True) -> Future[None]:
        """Take an adapter version out of its slot; rows still using it finish on it first.
        `retire=False` for the current version (see SlotTable.unload)."""
        return self.call(lambda: self.slots.unload_now(key, retire) if self.slots is not None else None)

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

    @property
    def slot_table(self) -> SlotTable | None:
        return None if self.slots is None else self.slots.table

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _publish(self) -> None:
        """Replace the snapshot other threads read (engine thread only)."""
        slots = wait = None
        if self.slots is not None:
            slots = self.slots.view(w.seq.request.adapter for w in self._waiting if w.seq.request.adapter is not None)
            wait = replace(self.wait_stats)
        runner = self.runner
        self._snapshot = EngineSnapshot(
            running=len(self._running), generated_tokens=self.generated_tokens, finished=dict(self.finished),
            compile={"enabled": runner.compiled, "graphs": runner.compile_counter.graphs,
                     "recompilations": runner.recompilations},
            slots=slots, wait=wait,
        )

    def _need_slots(self) -> EngineSlots:
        if self.slots is None:
            raise ValueError("this engine has no LoRA slots")
        return self.slots

    # ---- loop ----------------------------------------------------------------------------
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

    def _check_rows(self) -> None:
        """Every cache row is free or held by a running request (checked on the engine thread,
        between steps, where the two agree); a row held by nobody would never come back."""
        lost = self.max_rows - len(self._free_rows) - len(self._running)
        self._problem = None if lost == 0 else f"{lost} KV-cache row(s) are held by no request"
        if lost:
            log.error("engine: %s", self._problem)

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
                self._waiting.append(_Waiting(seq, item.sink))
            elif isinstance(item, Cancel):
                self._cancel(item.request_id, item.reason)
            elif isinstance(item, Call):
                item.run()
                self._publish()  # the caller's next read sees what its command did

    def step(self) -> None:
        """One scheduling iteration (also callable directly, without the thread, in tests): admit,
        then one forward for the decode tokens of every running row and the prompt chunks that
        fit the step's token budget."""
        self._admit()
        decoding = [seq for seq, _ in self._running.values() if seq.prefilled == seq.prompt_len]
        chunks = schedule_chunks(self._prefilling, self.chunk_size, self.max_num_batched_tokens - len(decoding),
                                 long_prompt=self.long_prefill_token_threshold, decoding=bool(decoding))
        if decoding or chunks:
            try:
                tokens = self.runner.step([seq.row for seq in decoding], [chunk for _, chunk in chunks])
            except Exception:  # find whose it is: run the parts apart, so only that request fails
                log.exception("engine step failed; running its parts apart")
                self._step_apart(decoding, chunks)
            else:
                self._finish_step(decoding, chunks, tokens)
        self._publish()

    def _finish_step(self, decoding: list[Sequence], chunks: list[tuple[Sequence, PromptChunk]],
                     tokens: list[int]) -> None:
        for seq, chunk in chunks:
            seq.prefilled = chunk.start + len(chunk.token_ids)
        started = [seq for seq, chunk in chunks if chunk.last]
        for seq in started:
            self._prefilling.remove(seq)
        now = time.monotonic()
        for seq, token in zip(decoding + started, tokens, strict=True):
            self._deliver(seq, token, now)

    def _step_apart(self, decoding: list[Sequence], chunks: list[tuple[Sequence, PromptChunk]]) -> None:
        """The step's decode rows alone (their failure is nobody's in particular: it reaches the
        loop, which fails what is in flight), then each prompt's chunks alone: a prompt whose
        chunk fails ends that request only."""
        if decoding:
            self._finish_step(decoding, [], self.runner.step([seq.row for seq in decoding]))
        failed: set[str] = set()
        for seq, chunk in chunks:
            if seq.request_id in failed or seq.request_id not in self._running:
                continue
            try:
                tokens = self.runner.step([], [chunk])
            except Exception as exc:
                log.exception("prefill of request %s failed", seq.request_id)
                failed.add(seq.request_id)
                self._fail(seq, f"prefill failed: {exc}")
                continue
            self._finish_step([], [(seq, chunk)], tokens)

    def _deliver(self, seq: Sequence, token: int, now: float) -> None:
        """Hand one sampled token to its request; whatever goes wrong there ends that request
        alone (its row and slot go back), never the step or the other rows."""
        if token == NON_FINITE:
            self._fail(seq, "the model's output became NaN or infinite for this request (its adapter's numbers "
                            "overflow); it was stopped")
            return
        try:
            self._emit(seq, seq.append(token, now))
        except Exception as exc:
            log.exception("request %s failed", seq.request_id)
            self._fail(seq, str(exc))

    def _fail(self, seq: Sequence, message: str) -> None:
        """End one admitted request with an error; its row and slot reference go back."""
        entry = self._running.get(seq.request_id)
        if entry is None:
            return
        event = self._count(seq.abort("error", error=message))
        self._release(seq)
        entry[1](event)

    def run_until_idle(self) -> None:
        """Drain the inbox and step until nothing is left (synchronous use, tests, benchmarks)."""
        self._drain_inbox(block=False)
        while self._running or self._waiting:
            self.step()
            self._drain_inbox(block=False)

    def _admit(self) -> None:
        """Give free rows to waiting requests, oldest first. Requests whose adapter is already in a
        slot (or that use none) cost nothing; others take an idle slot (evicting its least recently
        used adapter) or keep waiting. Once the oldest request has waited max_wait_s without a
        slot, nobody behind it is admitted, so busy slots drain and it cannot starve."""
        now = time.monotonic()
        for item in list(self._waiting):
            if not self._free_rows:
                break
            name = item.seq.request.adapter
            placement = None
            if name is not None:
                assert self.slots is not None
                placement = self.slots.acquire(name)
                if placement is None:  # every slot busy with other adapters
                    if now - item.since >= self.max_wait_s:
                        break  # starving: hold everyone behind it
                    continue
            self._dequeue(item)
            if placement is not None and placement.load and not self._load(item, placement):
                continue  # its adapter failed to load; the request is already answered
            self._start(item, None if placement is None else placement.slot, now)
        if self.slot_table is not None:  # unloaded versions stay marked only while queued rows need them
            self.slot_table.prune_retired(w.seq.request.adapter for w in self._waiting if w.seq.request.adapter)

    def _load(self, item: _Waiting, placement: SlotGrant) -> bool:
        """Write the request's adapter into its slot; on failure answer the request, return False."""
        name = item.seq.request.adapter
        assert name is not None and self.slots is not None
        try:
            weights = item.seq.request.adapter_weights
            if weights is None:
                if self.adapter_weights is None:
                    raise LookupError("the request carries no adapter weights")
                weights = self.adapter_weights(name)
            self.slots.write(placement.slot, weights)
            return True
        except Exception as exc:  # the adapter vanished or is broken: fail this request only
            log.exception("loading adapter %s failed", name)
            self.slots.abandon(placement.slot)
            item.sink(self._count(item.seq.abort("error", error=f"cannot load adapter {name!r}: {exc}")))
            return False

    def _dequeue(self, item: _Waiting) -> None:
        self._waiting.remove(item)
        self._inbox.left_queue()

    def _start(self, item: _Waiting, slot: int | None, now: float) -> None:
        seq = item.seq
        if seq.request.adapter is not None:
            self.wait_stats.add(now - item.since)
        seq.row = heapq.heappop(self._free_rows)
        seq.slot = slot
        self._running[seq.request_id] = (seq, item.sink)
        seed = seq.request.sampling.seed
        try:
            self.runner.reset_row(seq.row, seq.request.sampling, random.getrandbits(62) if seed is None else seed, slot)
        except Exception as exc:  # e.g. a parameter the row's tensors cannot hold: this request only
            log.exception("request %s could not start", seq.request_id)
            self._fail(seq, f"the request could not start: {exc}")
            return
        self._prefilling.append(seq)

    def _emit(self, seq: Sequence, event: TokenOutput) -> None:
        sink = self._running[seq.request_id][1]
        self.generated_tokens += len(event.token_ids)
        if seq.finished:
            self._count(event)
            self._release(seq)
        sink(event)

    def _count(self, event: TokenOutput) -> TokenOutput:
        """Record how a request ended; returns the event. Called before the request's row or
        queue place is given back, so a reader that sees it gone also sees it counted."""
        if event.finish_reason is not None:
            self.finished[event.finish_reason] += 1
        return event

    def _release(self, seq: Sequence) -> None:
        """Give back the request's row and slot reference. It leaves `_running` last, so a reader
        on another thread that sees it gone also sees its row free and its slot released."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.runner.free_row(seq.row, used=seq.prompt_len + len(seq.output_ids))
        if seq.slot is not None and self.slots is not None:
            self.slots.release(seq.slot)  # unloaded while in use: emptied with its last row
            seq.slot = None
        heapq.heappush(self._free_rows, seq.row)
        self._running.pop(seq.request_id, None)

    def _cancel(self, request_id: str, reason: FinishReason) -> None:
        for item in list(self._waiting):
            if item.seq.request_id == request_id:
                event = self._count(item.seq.abort(reason))
                self._dequeue(item)
                item.sink(event)
                return
        if request_id in self._running:
            seq, sink = self._running[request_id]
            event = self._count(seq.abort(reason))
            self._release(seq)
            sink(event)

    def _fail_all(self, message: str) -> None:
        for seq, sink in list(self._running.values()):
            event = self._count(seq.abort("error", error=message))
            self._release(seq)
            sink(event)
        for item in list(self._waiting):
            event = self._count(item.seq.abort("error", error=message))
            self._dequeue(item)
            item.sink(event)
