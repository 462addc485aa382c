"""The generation loop: admits requests into cache rows, interleaves prefill with decode, emits text.

Runs on its own thread so the HTTP event loop never waits on tensor work. Each iteration:
1. take new requests and cancellations from the inbox;
2. give waiting requests free rows (lowest row first, which keeps decode batches compact);
3. prefill one chunk of at most `prefill_chunk` prompt tokens for the oldest admitted request;
4. decode one token for every row that has finished its prefill.
Requests join and leave between iterations, so a long prompt never stalls running streams for
more than one chunk. Events go to each request's sink, a callable the caller supplies (the HTTP
layer bridges it into asyncio).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.detokenize import Decoder
from server.errors import EngineStoppedError
from server.runner import ModelRunner
from server.sequence import GenerationRequest, RequestOutput, Sequence

log = logging.getLogger("loraswap.engine")

Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class _Submit:
    request: GenerationRequest
    sink: Sink


@dataclass(frozen=True)
class _Cancel:
    request_id: str


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Decoder,
        *,
        eos_ids: frozenset[int],
        prefill_chunk: int = 512,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefill_chunk = prefill_chunk
        self.max_rows = runner.max_rows
        self.max_len = runner.max_len
        self._inbox: queue.SimpleQueue[_Submit | _Cancel | None] = queue.SimpleQueue()
        self._waiting: deque[tuple[Sequence, Sink]] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._running: dict[str, tuple[Sequence, Sink]] = {}  # admitted, by request id
        self._free_rows = list(range(self.max_rows))
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- public, thread-safe -------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        if self._stopping.is_set():
            raise EngineStoppedError("the engine is shutting down")
        self._inbox.put(_Submit(request, sink))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(_Cancel(request_id))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraswap-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

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
        self._fail_all("server shutting down")

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Submit):
                seq = Sequence(item.request, self.tokenizer, eos_ids=self.eos_ids, max_len=self.max_len)
                self._waiting.append((seq, item.sink))
            elif isinstance(item, _Cancel):
                self._cancel(item.request_id)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One scheduling iteration (also callable directly, without the thread, in tests)."""
        self._admit()
        self._prefill_one_chunk()
        decoding = [seq for seq, _ in self._running.values() if seq.prefilled == seq.prompt_len]
        if decoding:
            tokens = self.runner.decode([seq.row for seq in decoding])
            for seq, token in zip(decoding, tokens):
                self._emit(seq, seq.append(token))

    def run_until_idle(self) -> None:
        """Drain the inbox and step until nothing is left (synchronous use, tests, benchmarks)."""
        self._drain_inbox(block=False)
        while self._running or self._waiting:
            self.step()
            self._drain_inbox(block=False)

    def _admit(self) -> None:
        while self._waiting and self._free_rows:
            seq, sink = self._waiting.popleft()
            self._free_rows.sort()
            seq.row = self._free_rows.pop(0)
            seed = seq.request.sampling.seed
            self.runner.reset_row(
                seq.row,
                seq.request.sampling,
                random.getrandbits(62) if seed is None else seed,
                seq.request.lora_slot,
            )
            self._running[seq.request_id] = (seq, sink)
            self._prefilling.append(seq)

    def _prefill_one_chunk(self) -> None:
        if not self._prefilling:
            return
        seq = self._prefilling[0]
        start = seq.prefilled
        chunk = seq.request.prompt_ids[start : start + self.prefill_chunk]
        last = start + len(chunk) == seq.prompt_len
        token = self.runner.prefill(seq.row, chunk, start=start, last=last)
        seq.prefilled = start + len(chunk)
        if last:
            self._prefilling.popleft()
            assert token is not None
            self._emit(seq, seq.append(token))

    def _emit(self, seq: Sequence, event: RequestOutput | None) -> None:
        sink = self._running[seq.request_id][1]
        if seq.finished:
            self._release(seq)
        if event is not None:
            sink(event)

    def _release(self, seq: Sequence) -> None:
        self._running.pop(seq.request_id, None)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.runner.free_row(seq.row)
        self._free_rows.append(seq.row)

    def _cancel(self, request_id: str) -> None:
        for item in list(self._waiting):
            if item[0].request_id == request_id:
                self._waiting.remove(item)
                item[1](item[0].abort())
                return
        if request_id in self._running:
            seq, sink = self._running[request_id]
            self._release(seq)
            sink(seq.abort())

    def _fail_all(self, message: str) -> None:
        for seq, sink in list(self._running.values()) + list(self._waiting):
            if seq.row >= 0 and seq.request_id in self._running:
                self._release(seq)
            sink(seq.abort("error", error=message))
        self._waiting.clear()
