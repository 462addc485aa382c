"""Tensor side of the engine: one forward per step over cache rows, with per-row sampling state.

The runner owns every tensor the engine touches; the engine (scheduling, requests, text) only
passes row numbers and token ids in and gets token ids out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from adapters.lora_layer import PADDING
from server.forward_batch import ForwardBatch, PromptChunk, build_forward_batch, decode_spans
from server.model import LayerFn, Transformer, run_layer
from server.sampling import SamplingParams, sample
from adapters.shapes import power_of_two_bucket

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch
    from adapters.slot_bank import SlotBank

MIN_KV_BUCKET = 64
MAX_DECODE_SPANS = 4  # attention calls per layer for the decode block, at most
NON_FINITE = -1  # the "token" of a row whose logits are not finite


def kv_bucket(needed: int, max_len: int) -> int:
    """Attention window for `needed` positions: a power of two (>= 64), capped at max_len."""
    return power_of_two_bucket(needed, floor=MIN_KV_BUCKET, cap=max_len)


def chunk_window(needed: int, max_len: int) -> int:
    """Attention window of a prompt chunk that ends at position `needed` - 1: rounded up to a
    multiple of 64 only. Prompt chunks always run eager, so their windows make no compiled
    graphs, and a chunk late in a long prompt would read up to twice the keys it needs under a
    power-of-two bucket. A function of the chunk alone, so its numbers never depend on others."""
    return min(max_len, -(-needed // MIN_KV_BUCKET) * MIN_KV_BUCKET)


def kv_buckets(max_len: int) -> list[int]:
    """Every attention window decode can use (the shapes a compiled decode is warmed up on)."""
    buckets = [kv_bucket(1, max_len)]
    while buckets[-1] < max_len:
        buckets.append(kv_bucket(buckets[-1] + 1, max_len))
    return buckets


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles, then hands them to inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., object]:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


class ModelRunner:
    """One `step` runs one forward over every token the engine scheduled: the decode tokens of
    running rows and the prompt chunks of admitted ones (server/forward_batch.py).

    Batch invariance: a row's logits are bit-identical whichever rows and chunks share its step.
    With oneDNN-packed weights (float32 CPU) every kernel computes each token on its own, so one
    forward carries everything and decode runs over the rows up to the last decoding one. Otherwise
    (unpacked weights: GPUs, quantized, `compile=True`) a matmul's kernel depends on its row
    count, so the decode block always runs over all rows, a fixed shape, and each prompt chunk
    runs as a forward of its own. `compile=True` compiles that fixed-shape decode (one graph per
    attention window and LoRA on/off, all built by `warm_up`); prompt chunks stay eager.

    Per-row positions and slots are mirrored on the host, so building a step reads nothing back
    from the device; only the sampled tokens come back."""

    def __init__(self, model: Transformer, bank: SlotBank | None = None, *, compile: bool = False) -> None:
        if model.cache is None:
            raise RuntimeError("model has no KV cache; call allocate() first")
        self.model = model
        self.bank = bank
        self.compiled = compile
        self.fixed_rows = compile or not model.all_packed()
        self.compile_counter = CompileCounter()
        self.warm_graphs = 0  # graphs compiled by warm_up; any later one is a recompilation
        if compile:
            # One graph per (window, LoRA on/off); dynamo's default limit of 8 is too low.
            limit = 2 * len(kv_buckets(model.cache.max_len)) + 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            self._layer_fn: LayerFn | None = torch.compile(run_layer, backend=self.compile_counter, dynamic=False)
        else:
            self._layer_fn = None
        self.null_slot = bank.null_slot if bank is not None else 0
        self.max_rows = model.cache.max_rows
        self.max_len = model.cache.max_len
        self.scratch_row = model.cache.scratch_row
        device = model.home_device
        self.device = device
        rows = self.max_rows
        # Per-row sampling state, indexed by cache row (written at start, read by sampling).
        self.last_tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.steps = torch.zeros(rows, dtype=torch.int64, device=device)  # tokens sampled so far
        # Host mirrors: next position to write, and LoRA slot (null_slot = exactly the base model).
        self.positions: list[int] = [0] * rows
        self.slots: list[int] = [self.null_slot] * rows
        self.sampling: list[SamplingParams] = [SamplingParams(temperature=0)] * rows

    def reset_row(self, row: int, params: SamplingParams, seed: int, slot: int | None = None) -> None:
        if slot is not None and (self.bank is None or not 0 <= slot < self.bank.num_slots):
            raise ValueError(f"LoRA slot {slot} does not exist")
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seeds[row] = seed
        self.steps[row] = 0
        self.last_tokens[row] = 0
        self.slots[row] = self.null_slot if slot is None else slot
        self.positions[row] = 0
        self.sampling[row] = params

    def free_row(self, row: int, used: int = 1) -> None:
        """`used`: positions the row's sequence may have written (its prompt and output tokens);
        they are zeroed so nothing it computed, NaN included, reaches the row's next sequence."""
        assert self.model.cache is not None
        self.model.cache.clear_row(row, used)
        self.positions[row] = 0
        self.last_tokens[row] = 0
        self.slots[row] = self.null_slot

    def load_slot(self, slot: int, weights: object) -> None:
        """Hotswap an adapter into a slot (between steps, on the engine thread)."""
        if self.bank is None:
            raise RuntimeError("no LoRA slots")
        self.bank.load(slot, weights)  # type: ignore[arg-type]

    def clear_slot(self, slot: int) -> None:
        if self.bank is not None:
            self.bank.clear(slot)

    @property
    def recompilations(self) -> int:
        """Graphs compiled after warm-up (0 in steady state; always 0 without compile)."""
        return self.compile_counter.graphs - self.warm_graphs

    # ---- building forwards -----------------------------------------------------------------
    def _batch(self, decode_rows: Sequence[int], chunks: Sequence[PromptChunk], block: int) -> ForwardBatch:
        """The forward of decode rows (a block of rows [0, block)) and prompt chunks. Rows of the
        block that do not decode are padding: position 0, the scratch row, no adapter, any window."""
        decoding = set(decode_rows)
        positions, write_rows, windows, slots = [], [], [], []
        for row in range(block):
            if row in decoding:
                positions.append(self.positions[row])
                write_rows.append(row)
                windows.append(kv_bucket(self.positions[row] + 1, self.max_len))
                slots.append(self.slots[row])
            else:
                positions.append(0)
                write_rows.append(self.scratch_row)
                windows.append(None)
                slots.append(PADDING)
        # Each run of rows attends over its own window, so short rows do not pay for the longest;
        # fixed-shape (compiled) decode keeps one window for the whole block.
        spans = decode_spans(windows, 1 if self.fixed_rows else MAX_DECODE_SPANS)
        lora = None
        if self.bank is not None:
            offsets = itertools.accumulate((len(c.token_ids) for c in chunks), initial=block)
            segments = [(offset, len(c.token_ids), self.slots[c.row]) for c, offset in zip(chunks, offsets)]
            lora = self.bank.route(slots, segments, device=self.device)
        return build_forward_batch(
            decode_tokens=self.last_tokens[:block] if block else None, decode_positions=positions,
            decode_write_rows=write_rows, spans=spans, chunks=chunks,
            window=lambda needed: chunk_window(needed, self.max_len),
            sliding_window=self.model.cfg.sliding_window, device=self.device, lora=lora,
        )

    def _block(self, decode_rows: Sequence[int]) -> int:
        if not decode_rows:
            return 0
        # Packed weights compute each token on its own: the block ends at the last decoding row
        # (rows below it that do not decode, e.g. prompts still prefilling, are its only padding).
        return self.max_rows if self.fixed_rows else max(decode_rows) + 1

    def _logits(self, decode_rows: Sequence[int], chunks: Sequence[PromptChunk]) -> torch.Tensor | None:
        """Logits # [n, V] of the decode rows, then of the prompts' last tokens (last chunks);
        None when no token of the step is sampled."""
        block = self._block(decode_rows)
        if not self.fixed_rows:  # every kernel is per token: one forward for everything
            batch = self._batch(decode_rows, chunks, block)
            hidden = self.model.forward_batch(batch)  # [T, hidden]
            ends = [spec.offset + spec.length - 1 for spec, chunk in zip(batch.chunks, chunks) if chunk.last]
            wanted = list(decode_rows) + ends
            if not wanted:
                return None
            return self.model.logits(hidden[torch.tensor(wanted, dtype=torch.int64, device=self.device)])
        parts: list[torch.Tensor] = []
        if decode_rows:  # all rows, a fixed shape (lm_head too: an unpacked one depends on the row count)
            hidden = self.model.forward_batch(self._batch(decode_rows, [], block), self._layer_fn)
            index = torch.tensor(list(decode_rows), dtype=torch.int64, device=self.device)
            parts.append(self.model.logits(hidden)[index])
        for chunk in chunks:
            hidden = self.model.forward_batch(self._batch([], [chunk], 0))
            if chunk.last:
                parts.append(self.model.logits(hidden[-1:]))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- stepping --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, decode_rows: Sequence[int], chunks: Sequence[PromptChunk] = ()) -> list[int]:
        """One forward for every scheduled token; returns a token for each decode row (in order),
        then one for each last chunk (in order), NON_FINITE for a row whose logits are not."""
        sampled_rows = list(decode_rows) + [c.row for c in chunks if c.last]
        if not decode_rows and not chunks:
            return []
        logits = self._logits(decode_rows, chunks)
        tokens = [] if logits is None else self._sample(logits, sampled_rows).tolist()
        for row in decode_rows:  # only now: a step that raised changed no row
            self.positions[row] += 1
        for chunk in chunks:
            self.positions[chunk.row] = chunk.start + len(chunk.token_ids)
        return tokens

    def prefill(self, row: int, token_ids: list[int], *, start: int, last: bool) -> int | None:
        """Write `token_ids` at positions start.. of `row`; on the last chunk, sample its first token."""
        tokens = self.step([], [PromptChunk(row, token_ids, start, last)])
        return tokens[0] if last else None

    def decode(self, rows: list[int]) -> list[int]:
        """One token for each of `rows` (all already prefilled)."""
        return self.step(rows)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the fixed-shape decode once per attention window, with and without LoRA, so that
        every graph is compiled before the server reports ready. Leaves all rows free."""
        if not self.compiled:
            return
        rows = list(range(self.max_rows))
        variants: list[LoraBatch | None] = [None]
        if self.bank is not None:
            variants.append(self.bank.batch(torch.full((self.max_rows,), self.null_slot, device=self.device)))
        for kv_len in kv_buckets(self.max_len):
            for row in rows:
                self.positions[row] = kv_len - 1
            for lora in variants:  # every row writes to the scratch row: the cache stays clean
                batch = self._batch(rows, [], self.max_rows)
                batch = replace(batch, lora=lora, write_rows=torch.full_like(batch.write_rows, self.scratch_row))
                self.model.forward_batch(batch, self._layer_fn)
        for row in rows:
            self.free_row(row)
        self.warm_graphs = self.compile_counter.graphs

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Each row's next token, or NON_FINITE for a row whose logits hold NaN or inf (read back
        with the tokens: no extra device sync). A row's sum is non-finite exactly when one of its
        logits is (finite logits cannot add up past float32's range): one cheap reduction, a
        thirtieth of the cost of isfinite over the whole [n, V] tensor. `rows`: each logit row's
        cache row."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)  # [n]
        params = [self.sampling[row] for row in rows]
        random_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        tokens = sample(
            logits,
            temperature=self.temperature[index],
            top_k=self.top_k[index],
            top_p=self.top_p[index],
            seeds=self.seeds[index],
            steps=self.steps[index],
            random_rows=random_rows,
            filtering=any(params[i].top_k > 0 or params[i].top_p < 1 for i in random_rows),
        )  # [n]
        tokens = torch.where(torch.isfinite(logits.sum(dim=-1)), tokens, NON_FINITE)  # [n]
        self.steps[index] += 1
        self.last_tokens[index] = tokens.clamp(min=0)  # such a row is ended by the engine anyway
        return tokens
