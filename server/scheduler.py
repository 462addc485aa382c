"""The engine's scheduling core: which requests run, what each step computes, and what it
gives back (engine thread only; server/engine.py adds the thread, the inbox and the client API).

Each step:
1. admit waiting requests, oldest first, while a row is free (lowest first, which keeps decode
   batches compact) and the KV pool holds their prompt (less what the prefix cache already has,
   server/engine_blocks.py) with a watermark to spare;
2. schedule one decode token for every row that has finished its prefill, plus whole prompt
   chunks, oldest admitted request first, while they fit `max_num_batched_tokens`; each gets the
   KV blocks it writes into. When the pool runs dry, the newest running request is preempted: it
   gives its blocks back and waits at the head of the queue to recompute;
3. run them as one forward (server/runner.py) and hand each sampled token to its request.
Requests join and leave between steps, so a long prompt never stalls running streams for more
than one chunk.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters.slot_table import SlotTable
from server.engine_blocks import EngineBlocks
from server.engine_client import Sink
from server.engine_inbox import Inbox
from server.engine_slots import EngineSlots, Grants
from server.forward_batch import PromptChunk
from server.kv_blocks import BlockPool
from server.logprobs import TokenLogprob
from server.row_sampler import CLIENT_ERRORS, UNSAMPLED
from server.runner import ModelRunner
from server.scheduling import WaitStats, schedule_chunks
from server.sequence import AdapterUse, FinishReason, GenerationRequest, Sequence, TokenOutput

log = logging.getLogger("loraswap.engine")


@dataclass
class Waiting:
    seq: Sequence
    sink: Sink
    since: float = field(default_factory=time.monotonic)


class Scheduler:
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
        prefix_caching: bool = True,
        base_name: str = "base",
    ) -> None:
        """`slot_table` enables adapter requests: a request's adapter (its `adapter_weights`, or
        else `adapter_weights(key)`) is written into a slot on admission when it is not resident.
        `max_waiting` bounds the queue (QueueFullError beyond it). A request that has waited
        `max_wait_s` for a slot stops everyone behind it from being admitted until it gets one
        (no starvation). `on_slot_load(seconds)` hears how long each slot write took.
        `prefix_caching`: share the KV blocks of common prompt prefixes (per adapter version);
        `base_name`: what KV statistics call requests without an adapter."""
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
        pool = BlockPool(runner.num_blocks, runner.layout.block_size, prefix_caching=prefix_caching)
        if pool.num_blocks * pool.block_size < self.max_len:
            raise ValueError(f"the KV pool holds {pool.num_blocks * pool.block_size} positions, fewer than one "
                             f"sequence of max_model_len {self.max_len} needs")
        bank = runner.bank
        self.blocks = EngineBlocks(pool, chunk_size=self.chunk_size, base_name=base_name,
                                   lora_window=(lambda: 0) if bank is None else bank.window)
        self._inbox = Inbox(max_waiting)  # submissions and commands (server/engine.py drains it)
        modules = getattr(runner.model, "module_bank", None)  # module slots get a table of their own
        self.slots = None if slot_table is None else EngineSlots(
            slot_table, runner, on_slot_load, None if modules is None else SlotTable(modules.num_slots))
        self.adapter_weights = adapter_weights
        self.max_wait_s = max_wait_s
        self.wait_stats = WaitStats()
        self._waiting: deque[Waiting] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._running: dict[str, tuple[Sequence, Sink]] = {}  # admitted, by request id
        self._free_rows = list(range(self.max_rows))  # a heap: the lowest free row goes first
        # How requests ended in the engine ("abort": cancelled; "stop" includes the stop strings
        # the service found and cancelled with that reason), and the tokens it sampled.
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0}
        self.generated_tokens = 0
        self._problem: str | None = None  # set by _check_rows

    @property
    def slot_table(self) -> SlotTable | None:
        return None if self.slots is None else self.slots.table

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _need_slots(self) -> EngineSlots:
        if self.slots is None:
            raise ValueError("this engine has no LoRA slots")
        return self.slots

    def _check_rows(self) -> None:
        """Every row is free or held by a running request, and every KV block reference is a
        running request's (checked on the engine thread, between steps, where they agree): a row
        or a block held by nobody would never come back."""
        lost = self.max_rows - len(self._free_rows) - len(self._running)
        held = sum(len(seq.blocks) for seq, _ in self._running.values())
        self._problem = (
            f"{lost} row(s) are held by no request" if lost
            else f"{self.blocks.pool.references - held} KV block reference(s) are held by no request"
            if self.blocks.pool.references != held else None
        )
        if self._problem:
            log.error("engine: %s", self._problem)

    def step(self) -> None:
        """One scheduling iteration (also callable directly, without the thread, in tests): admit,
        then one forward for the decode tokens of every running row and the prompt chunks that
        fit the step's token budget."""
        self._admit()
        decoding, chunks = self._schedule()
        if decoding or chunks:
            try:
                tokens = self.runner.step([seq.row for seq in decoding], [chunk for _, chunk in chunks])
            except Exception:  # find whose it is: run the parts apart, so only that request fails
                log.exception("engine step failed; running its parts apart")
                self._step_apart(decoding, chunks)
            else:
                self._finish_step(decoding, chunks, tokens)
        self._publish()

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, PromptChunk]]]:
        """The step's decode rows and prompt chunks, each with the KV blocks it writes into.
        Decode rows come first, oldest first: one that finds the pool dry preempts the newest
        running request (possibly itself). Prompt chunks only take what is left; if nothing at
        all can run, the newest request other than the oldest prompt gives way."""
        ready = [seq for seq, _ in self._running.values() if seq.prefilled == seq.prefill_len]
        for seq in ready:
            while seq.request_id in self._running and not self.blocks.reserve(seq, seq.next_position + 1):
                self._preempt(next(reversed(self._running.values()))[0])
        decoding = [seq for seq in ready if seq.request_id in self._running]
        chunks = schedule_chunks(self._prefilling, self.chunk_size, self.max_num_batched_tokens - len(decoding),
                                 long_prompt=self.long_prefill_token_threshold, decoding=bool(decoding))
        granted = []
        for seq, chunk in chunks:
            if not self.blocks.reserve(seq, chunk.start + len(chunk.token_ids)):
                break
            granted.append((seq, chunk))
        if not decoding and not granted and self._prefilling:
            oldest = self._prefilling[0]
            victims = [s for s, _ in self._running.values() if s is not oldest]
            if victims:
                self._preempt(victims[-1])
        return decoding, granted

    def _preempt(self, seq: Sequence) -> None:
        """Take a running request's row and blocks back; it waits first in line to recompute its
        prompt and output so far (the client only sees a pause)."""
        log.info("preempting request %s (KV pool full)", seq.request_id)
        _, sink = self._running[seq.request_id]
        self._release(seq)
        self.blocks.preempted(seq)
        self._waiting.appendleft(Waiting(seq, sink))
        self._inbox.rejoin()

    def _finish_step(self, decoding: list[Sequence], chunks: list[tuple[Sequence, PromptChunk]],
                     tokens: list[int]) -> None:
        for seq, chunk in chunks:
            seq.prefilled = chunk.start + len(chunk.token_ids)
            self.blocks.prefilled(seq)
        started = [seq for seq, chunk in chunks if chunk.last]
        for seq in started:
            self._prefilling.remove(seq)
        now = time.monotonic()
        sampler = self.runner.sampler
        for seq, token in zip(decoding + started, tokens, strict=True):
            prompt_logprobs = sampler.take_prompt_logprobs(seq.row) if seq in started else None
            self._deliver(seq, token, now, sampler.step_logprobs.get(seq.row), prompt_logprobs)

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

    def _deliver(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None,
                 prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        """Hand one sampled token to its request; whatever goes wrong there ends that request
        alone (its row and slot go back), never the step or the other rows."""
        if token in UNSAMPLED:
            self._fail(seq, UNSAMPLED[token], client_error=token in CLIENT_ERRORS)
            return
        try:
            self._emit(seq, seq.append(token, now, logprob, prompt_logprobs))
        except Exception as exc:
            log.exception("request %s failed", seq.request_id)
            self._fail(seq, str(exc))

    def _fail(self, seq: Sequence, message: str, client_error: bool = False) -> None:
        """End one admitted request with an error; its row and slot reference go back."""
        entry = self._running.get(seq.request_id)
        if entry is None:
            return
        event = self._count(seq.abort("error", error=message, client_error=client_error))
        self._release(seq)
        entry[1](event)

    def _admit(self) -> None:
        """Give free rows to waiting requests, oldest first. Requests whose adapters are already in
        slots (or that use none) cost nothing; others take idle slots (evicting their least
        recently used adapters) or keep waiting; a request that mixes adapters needs all of them
        at once. Once the oldest request has waited max_wait_s without slots, nobody behind it is
        admitted, so busy slots drain and it cannot starve."""
        now = time.monotonic()
        for item in list(self._waiting):
            if not self._free_rows or not self.blocks.can_start(item.seq):
                break  # in order: a long prompt waiting for memory is not overtaken for ever
            keys = item.seq.request.adapter_keys
            grants = Grants()
            if keys:
                assert self.slots is not None
                if not self.slots.table.could_hold(keys):
                    self._refuse(item, f"the request mixes {len(keys)} adapters but only "
                                       f"{self.slots.table.unpinned_capacity(keys)} slots can hold them (the others are pinned)")
                    continue
                try:
                    saving = self._saving_use(item.seq.request)
                    module_key = None if saving is None else saving.key
                except Exception as exc:  # the adapter vanished: this request only
                    self._refuse(item, f"cannot load adapter {keys[0]!r}: {exc}")
                    continue
                found = self.slots.acquire_all(keys, module_key)
                if found is None:  # every slot busy with other adapters
                    if now - item.since >= self.max_wait_s:
                        break  # starving: hold everyone behind it
                    continue
                grants = found
            self._dequeue(item)
            if not self._load(item, grants):
                continue  # an adapter failed to load; the request is already answered
            self._start(item, grants, now)
        if self.slots is not None:  # unloaded versions stay marked only while queued rows need them
            self.slots.prune_retired(key for w in self._waiting for key in w.seq.request.adapter_keys)

    def _refuse(self, item: Waiting, message: str) -> None:
        """Answer a queued request that can never be admitted with an error."""
        self._dequeue(item)
        item.sink(self._count(item.seq.abort("error", error=message)))

    def _weights(self, use: AdapterUse) -> Any:
        if use.weights is not None:
            return use.weights
        if self.adapter_weights is None:
            raise LookupError("the request carries no adapter weights")
        return self.adapter_weights(use.key)

    def _saving_use(self, request: GenerationRequest) -> AdapterUse | None:
        """The request's adapter that saved its embedding or head (modules_to_save), if any."""
        return next((use for use in request.uses if getattr(self._weights(use), "full", None) is not None), None)

    def _load(self, item: Waiting, grants: Grants) -> bool:
        """Write the request's adapters that are not resident into their slots; on failure give
        every slot back, answer the request and return False."""
        assert grants.lora or not item.seq.request.uses
        uses = item.seq.request.uses
        written = 0
        try:
            for written, (use, grant) in enumerate(zip(uses, grants.lora)):
                if grant.load:
                    assert self.slots is not None
                    self.slots.write(grant.slot, self._weights(use))
            written = len(grants.lora)
            if grants.module is not None and grants.module.load:
                assert self.slots is not None
                saving = self._saving_use(item.seq.request)
                assert saving is not None
                self.slots.write_module(grants.module.slot, self._weights(saving).full)
        except Exception as exc:  # the adapter vanished or is broken: fail this request only
            key = uses[min(written, len(uses) - 1)].key
            log.exception("loading adapter %s failed", key)
            assert self.slots is not None
            self.slots.give_back(grants, written=written)
            item.sink(self._count(item.seq.abort("error", error=f"cannot load adapter {key!r}: {exc}")))
            return False
        return True

    def _dequeue(self, item: Waiting) -> None:
        self._waiting.remove(item)
        self._inbox.left_queue()

    def _start(self, item: Waiting, grants: Grants, now: float) -> None:
        seq = item.seq
        slots = [grant.slot for grant in grants.lora]
        if slots and not seq.output_ids:  # a resumed request waited once already
            self.wait_stats.add(now - item.since)
        seq.row = heapq.heappop(self._free_rows)
        seq.slots = slots
        seq.module_slot = None if grants.module is None else grants.module.slot
        self._running[seq.request_id] = (seq, item.sink)
        self.blocks.start(seq)
        if seq.seed is None:  # drawn once: a preempted request resumes the same random stream
            seed = seq.request.sampling.seed
            seq.seed = random.getrandbits(62) if seed is None else seed
        try:
            mix = tuple((slot, use.weight) for slot, use in zip(slots, seq.request.uses))
            self.runner.reset_row(seq.row, seq.request.sampling, seq.seed, table=seq.blocks,
                                  steps=len(seq.output_ids), mix=mix, module_slot=seq.module_slot,
                                  stop_ids=seq.stop_ids, prompt=seq.request.prompt_ids, history=seq.output_ids)
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
        """Record how a request ended; returns the event. Called before its row or queue place is
        given back: a reader that sees it gone sees it counted."""
        if event.finish_reason is not None:
            self.finished[event.finish_reason] += 1
        return event

    def _release(self, seq: Sequence) -> None:
        """Give back the request's row and slot reference. It leaves `_running` last, so a reader
        on another thread that sees it gone also sees its row free and its slot released."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.runner.free_row(seq.row)
        self.blocks.release(seq)
        if self.slots is not None:
            for slot in seq.slots:
                self.slots.release(slot)  # unloaded while in use: emptied with its last row
            if seq.module_slot is not None:
                self.slots.release_module(seq.module_slot)
        seq.slots, seq.module_slot = [], None
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

