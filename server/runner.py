"""Tensor side of the engine: one forward per step over rows, with per-row sampling state.

A row is a running sequence's place in the decode block and its sampling state; its keys and
values live in the KV blocks its block table lists (the engine hands blocks out, server/kv_blocks.py).
The runner owns every tensor the engine touches; the engine (scheduling, requests, text) only
passes row numbers, block tables and token ids in and gets token ids out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from adapters.lora_layer import Terms
from server.forward_batch import ForwardBatch, PromptChunk, build_forward_batch
from server.kv_cache import blocks_for
from server.model import LayerFn, Transformer, run_layer
from server.row_sampler import RowSampler
from server.sampling import SamplingParams

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch
    from adapters.module_bank import ModuleBank
    from adapters.slot_bank import SlotBank

MIN_KV_BUCKET = 64


def chunk_window(needed: int, max_len: int) -> int:
    """Attention window of a prompt chunk that ends at position `needed` - 1: rounded up to a
    multiple of 64, so a chunk's window is a function of the chunk alone (its numbers never
    depend on others) and reads at most 63 positions it does not need."""
    return min(max_len, -(-needed // MIN_KV_BUCKET) * MIN_KV_BUCKET)


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
            self._layer_fn: LayerFn | None = torch.compile(run_layer, backend=self.compile_counter, dynamic=False)
        else:
            self._layer_fn = None
        self.null_slot = bank.null_slot if bank is not None else 0
        self.max_rows = model.max_rows
        self.max_len = model.max_len
        self.layout = model.cache_layout()
        self.table_width = blocks_for(self.max_len, self.layout.block_size)  # blocks of a full-length sequence
        device = model.home_device
        self.device = device
        rows = self.max_rows
        self.last_tokens = torch.zeros(rows, dtype=torch.int64, device=device)  # each row's next decode input
        self.sampler = RowSampler(rows, self._logit_width, device)  # temperature, controls, grammar, logprobs
        # Host mirrors: next position to write, and what each row's LoRA adds ((slot, weight) per
        # adapter; () = exactly the base model).
        self.positions: list[int] = [0] * rows
        self.tables: list[list[int]] = [[] for _ in range(rows)]  # each row's block table (the engine's list)
        self.terms: list[Terms] = [()] * rows
        self.module_slots: list[int | None] = [None] * rows  # each row's module slot (modules_to_save)

    def reset_row(self, row: int, params: SamplingParams, seed: int, slot: int | None = None, *,
                  table: list[int] | None = None, steps: int = 0, scale: float = 1.0, mix: Terms = (),
                  module_slot: int | None = None, stop_ids: tuple[int, ...] = (),
                  prompt: Sequence[int] = (), history: Sequence[int] = ()) -> None:
        """Start a sequence on `row`. `table`: its block table, kept by reference (the engine
        appends blocks as it grows); None: the row's fixed share of the pool, blocks [row * M,
        (row + 1) * M) for M = max_len / block_size (tests and tools that drive the runner
        directly). `steps`: tokens it sampled before (a preempted sequence resumes its seeded
        random stream where it left off). `scale`: multiplies the row's adapter delta. `mix`:
        instead of `slot` and `scale`, the (slot, weight) of each adapter the row adds.
        `module_slot`: where the row's adapter keeps its saved embedding and head. `stop_ids`:
        what min_tokens holds back; `prompt` and `history` (tokens it generated before, for a
        resumed request): what its penalties see, whether or not the prefix cache spares
        computing them."""
        bank = self.module_bank
        if module_slot is not None and (bank is None or not 0 <= module_slot < bank.num_slots):
            raise ValueError(f"module slot {module_slot} does not exist")
        terms = mix or ((() if slot is None else ((slot, scale),)))
        for used, _ in terms:
            if self.bank is None or not 0 <= used < self.bank.num_slots:
                raise ValueError(f"LoRA slot {used} does not exist")
        self.sampler.reset(row, params, seed, steps=steps, stop_ids=stop_ids, prompt=prompt, history=history)
        self.last_tokens[row] = 0
        self.terms[row] = terms
        self.module_slots[row] = module_slot
        self.positions[row] = 0
        self.tables[row] = self.model.fixed_share(row) if table is None else table

    @property
    def module_bank(self) -> ModuleBank | None:
        """The model's module slots (modules_to_save), if it has any (the transformers-backed path has none)."""
        return getattr(self.model, "module_bank", None)

    def _logit_width(self) -> int:
        """Columns of the logits a step produces (module slots widen them by the added tokens)."""
        bank = self.module_bank
        return bank.max_vocab if bank is not None else self.model.cfg.vocab_size

    def free_row(self, row: int) -> None:
        """Forget the row's sequence. Its blocks go back to the engine's pool; nothing is cleared,
        since no reader ever looks at positions its sequence has not written."""
        self.positions[row] = 0
        self.last_tokens[row] = 0
        self.terms[row] = ()
        self.module_slots[row] = None
        self.tables[row] = []
        self.sampler.free(row)

    def load_slot(self, slot: int, weights: object) -> None:
        """Hotswap an adapter into a slot (between steps, on the engine thread)."""
        if self.bank is None:
            raise RuntimeError("no LoRA slots")
        self.bank.load(slot, weights)  # type: ignore[arg-type]

    def clear_slot(self, slot: int) -> None:
        if self.bank is not None:
            self.bank.clear(slot)

    def load_module_slot(self, slot: int, full: object) -> None:
        """Write an adapter's saved embedding and head into a module slot (engine thread)."""
        bank = self.module_bank
        if bank is None:
            raise RuntimeError("no module slots")
        bank.load(slot, full)

    def clear_module_slot(self, slot: int) -> None:
        bank = self.module_bank
        if bank is not None:
            bank.clear(slot)

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV pool."""
        assert self.model.cache is not None
        return self.model.cache.num_blocks

    @property
    def recompilations(self) -> int:
        """Graphs compiled after warm-up (0 in steady state; always 0 without compile)."""
        return self.compile_counter.graphs - self.warm_graphs

    # ---- building forwards -----------------------------------------------------------------
    def _batch(self, decode_rows: Sequence[int], chunks: Sequence[PromptChunk], block: int) -> ForwardBatch:
        """The forward of decode rows (a block of rows [0, block)) and prompt chunks. Rows of the
        block that do not decode are padding: position 0, no blocks, no adapter."""
        decoding = set(decode_rows)
        positions: list[int] = []
        tables: list[list[int] | None] = []
        terms: list[Terms | None] = []
        for row in range(block):
            if row in decoding:
                positions.append(self.positions[row])
                tables.append(self.tables[row])
                terms.append(self.terms[row])
            else:
                positions.append(0)
                tables.append(None)
                terms.append(None)  # padding: its output is dropped
        lora = None
        if self.bank is not None:
            offsets = itertools.accumulate((len(c.token_ids) for c in chunks), initial=block)
            spans = [(offset, len(c.token_ids), self.terms[c.row]) for c, offset in zip(chunks, offsets)]
            lora = self.bank.route(terms, spans, device=self.device)
        batch = build_forward_batch(
            layout=self.layout, decode_tokens=self.last_tokens[:block] if block else None,
            decode_positions=positions, decode_tables=tables,
            # Fixed-shape (compiled) decode keeps one table width, so growing never recompiles.
            table_width=self.table_width if self.fixed_rows else None,
            chunks=chunks, chunk_tables=[self.tables[c.row] for c in chunks],
            window=lambda needed: chunk_window(needed, self.max_len),
            windows=self.model.cfg.windows, device=self.device, lora=lora,
        )
        return self._embed_copies(batch, [row for row in range(block) if row in decoding], chunks)

    def _embed_copies(self, batch: ForwardBatch, decode_rows: Sequence[int], chunks: Sequence[PromptChunk]) -> ForwardBatch:
        """Route the tokens of rows whose adapter saved its embedding to their module slot."""
        bank = self.module_bank
        if bank is None or not any(bank.embeds(self.module_slots[r]) for r in [*decode_rows, *(c.row for c in chunks)]):
            return batch
        flat: list[int] = []
        offsets: list[int] = []
        for row in decode_rows:  # the decode block's flat token is its row
            if bank.embeds(slot := self.module_slots[row]):
                flat.append(row)
                offsets.append(slot * bank.max_vocab)
        start = batch.decode_rows
        for chunk in chunks:
            if bank.embeds(slot := self.module_slots[chunk.row]):
                flat += range(start, start + len(chunk.token_ids))
                offsets += [slot * bank.max_vocab] * len(chunk.token_ids)
            start += len(chunk.token_ids)
        index = torch.tensor(flat, dtype=torch.int64, device=self.device)
        return replace(batch, embed_copies=(index, torch.tensor(offsets, dtype=torch.int64, device=self.device)))

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
            for spec, chunk in zip(batch.chunks, chunks):
                self._score_prompt(chunk, hidden[spec.offset : spec.offset + spec.length])
            ends = [spec.offset + spec.length - 1 for spec, chunk in zip(batch.chunks, chunks) if chunk.last]
            wanted = list(decode_rows) + ends
            if not wanted:
                return None
            heads = [self.module_slots[r] for r in [*decode_rows, *(c.row for c in chunks if c.last)]]
            return self.model.logits(hidden[torch.tensor(wanted, dtype=torch.int64, device=self.device)], heads)
        parts: list[torch.Tensor] = []
        decoding = set(decode_rows)
        if decode_rows:  # all rows, a fixed shape (lm_head too: an unpacked one depends on the row count)
            hidden = self.model.forward_batch(self._batch(decode_rows, [], block), self._layer_fn)
            index = torch.tensor(list(decode_rows), dtype=torch.int64, device=self.device)
            heads = [self.module_slots[row] if row in decoding else None for row in range(block)]
            parts.append(self.model.logits(hidden, heads)[index])
        for chunk in chunks:
            hidden = self.model.forward_batch(self._batch([], [chunk], 0))
            self._score_prompt(chunk, hidden)
            if chunk.last:
                parts.append(self.model.logits(hidden[-1:], [self.module_slots[chunk.row]]))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _score_prompt(self, chunk: PromptChunk, hidden: torch.Tensor) -> None:
        """Prompt logprobs of a chunk whose request asked for them. hidden # [len(chunk), hidden]"""
        if self.sampler.wants_prompt_logprobs(chunk.row):
            logits = self.model.logits(hidden, [self.module_slots[chunk.row]] * hidden.shape[0])  # [L, V]
            self.sampler.add_prompt_logprobs(chunk.row, logits, chunk.start)

    # ---- stepping --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, decode_rows: Sequence[int], chunks: Sequence[PromptChunk] = ()) -> list[int]:
        """One forward for every scheduled token; returns a token for each decode row (in order),
        then one for each last chunk (in order), NON_FINITE for a row whose logits are not."""
        sampled_rows = list(decode_rows) + [c.row for c in chunks if c.last]
        self.sampler.step_logprobs = {}
        if not decode_rows and not chunks:
            return []
        self.sampler.begin_masks(sampled_rows)  # grammar masks, while the forward runs
        logits = self._logits(decode_rows, chunks)
        tokens = [] if logits is None else self._sample(logits, sampled_rows)
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
        """Run the fixed-shape decode once with and without LoRA, so that every graph is compiled
        before the server reports ready. Every row is padding: nothing is written but the
        scratch block."""
        if not self.compiled:
            return
        variants: list[LoraBatch | None] = [None]
        if self.bank is not None:
            variants.append(self.bank.batch(torch.full((self.max_rows,), self.null_slot, device=self.device)))
        for lora in variants:
            batch = replace(self._batch([], [], self.max_rows), lora=lora)
            self.model.forward_batch(batch, self._layer_fn)
        self.warm_graphs = self.compile_counter.graphs

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Each row's next token (server/row_sampler.py); `rows`: the runner row of each logit
        row. The decode block reads its inputs from `last_tokens`, on the device."""
        tokens, chosen = self.sampler.sample(logits, rows)
        self.last_tokens[torch.tensor(rows, dtype=torch.int64, device=self.device)] = tokens.clamp(min=0)
        return chosen
