"""The generation loop: admits requests into cache rows, interleaves prefill with decode, emits text.

Runs on its own thread so the HTTP event loop never waits on tensor work. Each iteration:
1. take new requests and cancellations from the inbox;
2. give waiting requests free rows (lowest row first, which keeps decode batches compact);
3. prefill whole prompt chunks, oldest admitted request first, up to `prefill_chunk` tokens;
4. decode one token for every row that has finished its prefill.
Requests join and leave between iterations, so a long prompt never stalls running streams for
more than one chunk. Events go to each request's sink, a callable the caller supplies (the HTTP
layer bridges it into asyncio).
"""

from __future__ import annotations

import heapq
import logging
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.slot_table import Placement, SlotTable
from server.detokenize import Decoder
from server.errors import ConflictError, EngineStoppedError, QueueFullError, SlotsBusyError
from server.runner import NON_FINITE, ModelRunner
from server.sequence import GenerationRequest, RequestOutput, Sequence

log = logging.getLogger("loraswap.engine")

Sink = Callable[[RequestOutput], None]
STALL_S = 120.0  # a step this long with work pending means the engine is stuck


@dataclass(frozen=True)
class _Submit:
    request: GenerationRequest
    sink: Sink


@dataclass(frozen=True)
class _Cancel:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Work that must run on the engine thread between steps (slot changes from the admin API)."""

    fn: Callable[[], Any]
    future: Future[Any]


@dataclass
class _Waiting:
    seq: Sequence
    sink: Sink
    since: float = field(default_factory=time.monotonic)


@dataclass
class WaitStats:
    admitted: int = 0
    total_wait_s: float = 0.0
    max_wait_s: float = 0.0


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Decoder,
        *,
        eos_ids: frozenset[int],
        prefill_chunk: int = 512,
        slot_table: SlotTable | None = None,
        adapter_weights: Callable[[str], Any] | None = None,
        max_waiting: int = 1024,
        max_wait_s: float = 2.0,
    ) -> None:
        """`slot_table` enables adapter requests: a request's adapter (its `adapter_weights`, or
        else `adapter_weights(key)`) is written into a slot on admission when it is not resident. `max_waiting` bounds the queue
        (QueueFullError beyond it). A request that has waited `max_wait_s` for a slot stops
        everyone behind it from being admitted until it gets one (no starvation)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefill_chunk = prefill_chunk
        self.max_rows = runner.max_rows
        self.max_len = runner.max_len
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | _Call | None] = queue.SimpleQueue()
        self.slot_table = slot_table
        self.adapter_weights = adapter_weights
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.wait_stats = WaitStats()
        self._pending = 0  # submitted and not yet admitted or cancelled
        self._pending_lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._running: dict[str, tuple[Sequence, Sink]] = {}  # admitted, by request id
        self._free_rows = list(range(self.max_rows))  # a heap: the lowest free row goes first
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.on_slot_load: Callable[[float], None] | None = None  # metrics hook: seconds per slot write
        # How requests ended in the engine ("abort": cancelled; counted where it happens, so a
        # cancel that never reaches the engine shows), and the tokens it sampled. Fixed keys: read
        # from other threads while the engine thread counts.
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.generated_tokens = 0
        self._heartbeat = time.monotonic()  # end of the engine loop's last iteration
        self._problem: str | None = None  # set by _check_rows

    # ---- public, thread-safe -------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        if self._stopping.is_set():
            raise EngineStoppedError("the engine is shutting down")
        if request.adapter is not None and self.slot_table is None:
            raise ValueError("this engine has no LoRA slots")
        with self._pending_lock:
            if self._pending >= self.max_waiting:
                raise QueueFullError(f"{self._pending} requests are already waiting; retry shortly")
            self._pending += 1
        self._inbox.put(_Submit(request, sink))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn() on the engine thread between two steps; its result or exception lands in the
        future (the slot tensors and the slot table are only ever touched from that thread)."""
        future: Future[Any] = Future()
        self._inbox.put(_Call(fn, future))
        return future

    def load_adapter(self, key: str, weights: Any, *, pin: bool) -> Future[int]:
        """Write an adapter version into a slot now (if not resident) and pin or unpin it."""
        return self.call(lambda: self._load_now(key, weights, pin))

    def activate_adapter(self, key: str) -> Future[None]:
        """A published (current) version: undo an earlier unload of the same key."""
        return self.call(lambda: self.slot_table.revive(key) if self.slot_table is not None else None)

    def unload_adapter(self, key: str, *, retire: bool = True) -> Future[None]:
        """Take an adapter version out of its slot; rows still using it finish on it first.
        `retire=False` for the current version (see SlotTable.unload)."""
        return self.call(lambda: self._unload_now(key, retire))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraswap-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, object]:
        """Scheduler counters for /ready (read from another thread: plain ints and copies)."""
        out: dict[str, object] = {"running": len(self._running), "waiting": self._pending}
        out["finished"] = dict(self.finished)
        out["generated_tokens"] = self.generated_tokens
        out["compile"] = {
            "enabled": self.runner.compiled,
            "graphs": self.runner.compile_counter.graphs,
            "recompilations": self.runner.recompilations,
        }
        if self.slot_table is not None:
            counters = self.slot_table.counters
            out["slots"] = {
                "resident": self.slot_table.resident(),
                "references": self.slot_table.references(),
                "loads": counters.loads,
                "evictions": counters.evictions,
                "hits": counters.hits,
                "waits": counters.waits,
                # tuple() copies the deque in one C call (atomic under the GIL) while the loop mutates it.
                "waiting_adapters": sorted(
                    {w.seq.request.adapter for w in tuple(self._waiting) if w.seq.request.adapter is not None}
                ),
            }
            admitted = self.wait_stats.admitted
            out["adapter_wait_s"] = {
                "admitted": admitted,
                "mean": self.wait_stats.total_wait_s / admitted if admitted else 0.0,
                "max": self.wait_stats.max_wait_s,
            }
        return out

    @property
    def num_running(self) -> int:
        return len(self._running)

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
        busy = bool(self._running) or self._pending > 0
        if busy and time.monotonic() - self._heartbeat > STALL_S:
            return f"the engine has not finished a step in {STALL_S:.0f} s"
        return self._problem

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Submit):
                seq = Sequence(item.request, self.tokenizer, eos_ids=self.eos_ids, max_len=self.max_len)
                self._waiting.append(_Waiting(seq, item.sink))
            elif isinstance(item, _Cancel):
                self._cancel(item.request_id)
            elif isinstance(item, _Call) and item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except Exception as exc:  # reported to the caller, the engine keeps going
                    item.future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One scheduling iteration (also callable directly, without the thread, in tests)."""
        self._admit()
        self._prefill()
        decoding = [seq for seq, _ in self._running.values() if seq.prefilled == seq.prompt_len]
        if decoding:
            tokens = self.runner.decode([seq.row for seq in decoding])
            for seq, token in zip(decoding, tokens):
                self._deliver(seq, token)

    def _deliver(self, seq: Sequence, token: int) -> None:
        """Hand one sampled token to its request; whatever goes wrong there ends that request
        alone (its row and slot go back), never the step or the other rows."""
        if token == NON_FINITE:
            self._fail(seq, "the model's output became NaN or infinite for this request (its adapter's numbers "
                            "overflow); it was stopped")
            return
        try:
            self._emit(seq, seq.append(token))
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
                assert self.slot_table is not None
                placement = self.slot_table.acquire(name)
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

    def _load(self, item: _Waiting, placement: Placement) -> bool:
        """Write the request's adapter into its slot; on failure answer the request, return False."""
        name = item.seq.request.adapter
        assert name is not None and self.slot_table is not None
        try:
            weights = item.seq.request.adapter_weights
            if weights is None:
                if self.adapter_weights is None:
                    raise LookupError("the request carries no adapter weights")
                weights = self.adapter_weights(name)
            self._write_slot(placement.slot, weights)
            return True
        except Exception as exc:  # the adapter vanished or is broken: fail this request only
            log.exception("loading adapter %s failed", name)
            self.slot_table.release(placement.slot)
            self.slot_table.forget(placement.slot)
            item.sink(self._count(item.seq.abort("error", error=f"cannot load adapter {name!r}: {exc}")))
            return False

    def _write_slot(self, slot: int, weights: Any) -> None:
        start = time.monotonic()
        self.runner.load_slot(slot, weights)
        if self.on_slot_load is not None:
            self.on_slot_load(time.monotonic() - start)

    def _dequeue(self, item: _Waiting) -> None:
        self._waiting.remove(item)
        with self._pending_lock:
            self._pending -= 1

    def _start(self, item: _Waiting, slot: int | None, now: float) -> None:
        seq = item.seq
        if seq.request.adapter is not None:
            waited = now - item.since
            self.wait_stats.admitted += 1
            self.wait_stats.total_wait_s += waited
            self.wait_stats.max_wait_s = max(self.wait_stats.max_wait_s, waited)
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

    def _prefill(self) -> None:
        """Prefill whole chunks, oldest request first, until this step has used `prefill_chunk`
        prompt tokens (at least one chunk). Chunk boundaries are fixed per request (multiples of
        prefill_chunk) whatever else is queued, so a prompt's numbers never depend on its
        neighbours; many short prompts share one step instead of taking one step each."""
        budget = self.prefill_chunk
        while self._prefilling:
            seq = self._prefilling[0]
            size = min(self.prefill_chunk, seq.prompt_len - seq.prefilled)
            if size > budget:
                return
            try:
                self._prefill_one_chunk(seq)
            except Exception as exc:  # this prompt's failure is this request's alone
                log.exception("prefill of request %s failed", seq.request_id)
                self._fail(seq, f"prefill failed: {exc}")
            budget -= size

    def _prefill_one_chunk(self, seq: Sequence) -> None:
        start = seq.prefilled
        chunk = seq.request.prompt_ids[start : start + self.prefill_chunk]
        last = start + len(chunk) == seq.prompt_len
        token = self.runner.prefill(seq.row, chunk, start=start, last=last)
        seq.prefilled = start + len(chunk)
        if last:
            self._prefilling.popleft()
            assert token is not None
            self._deliver(seq, token)

    def _emit(self, seq: Sequence, event: RequestOutput) -> None:
        sink = self._running[seq.request_id][1]
        self.generated_tokens += len(event.token_ids)
        if seq.finished:
            self._count(event)
            self._release(seq)
        sink(event)

    def _count(self, event: RequestOutput) -> RequestOutput:
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
        if seq.slot is not None and self.slot_table is not None:
            if self.slot_table.release(seq.slot):  # unloaded while in use: empty it now
                self.runner.clear_slot(seq.slot)
            seq.slot = None
        heapq.heappush(self._free_rows, seq.row)
        self._running.pop(seq.request_id, None)

    def _load_now(self, key: str, weights: Any, pin: bool) -> int:
        table = self.slot_table
        if table is None:
            raise ValueError("this engine has no LoRA slots")
        placement = table.acquire(key)
        if placement is None:
            raise SlotsBusyError("every slot is in use by running requests; retry shortly")
        try:
            if placement.load:
                self._write_slot(placement.slot, weights)
        except Exception:
            table.release(placement.slot)
            table.forget(placement.slot)
            raise
        if table.release(placement.slot):  # a retired version: it does not stay resident
            self.runner.clear_slot(placement.slot)
            raise ConflictError(f"{key} has been replaced or deleted")
        try:
            table.pin(key, pin)
        except ValueError as exc:
            raise ConflictError(str(exc)) from None
        return placement.slot

    def _unload_now(self, key: str, retire: bool) -> None:
        if self.slot_table is not None and (slot := self.slot_table.unload(key, retire=retire)) is not None:
            self.runner.clear_slot(slot)

    def _cancel(self, request_id: str) -> None:
        for item in list(self._waiting):
            if item.seq.request_id == request_id:
                event = self._count(item.seq.abort())
                self._dequeue(item)
                item.sink(event)
                return
        if request_id in self._running:
            seq, sink = self._running[request_id]
            event = self._count(seq.abort())
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
