"""Tensor side of the engine: prefill and decode over cache rows, with per-row sampling state.

The runner owns every tensor the engine touches; the engine (scheduling, requests, text) only
passes row numbers and token ids in and gets token ids out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from server.model import LayerFn, Transformer, run_layer
from server.sampling import SamplingParams, sample
from server.shapes import power_of_two_bucket

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch
    from adapters.slot_bank import SlotBank

MIN_KV_BUCKET = 64
NON_FINITE = -1  # the "token" of a row whose logits are not finite


def kv_bucket(needed: int, max_len: int) -> int:
    """Attention window for `needed` positions: a power of two (>= 64), capped at max_len."""
    return power_of_two_bucket(needed, floor=MIN_KV_BUCKET, cap=max_len)


def row_bucket(needed: int, max_rows: int) -> int:
    """Rows a decode step runs over when the highest active row is needed - 1."""
    return power_of_two_bucket(needed, cap=max_rows)


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
    """Decode is batch-invariant: a row's logits are bit-identical whichever rows share its step.
    With oneDNN-packed weights (float32 CPU) every kernel in the step computes each row on its own
    and decode runs over a power-of-two bucket of rows; otherwise (unpacked weights: GPUs,
    `compile=True`) the matmul kernels depend on the row count, so decode always runs over all
    rows, a fixed shape. `compile=True` compiles that fixed-shape step (one graph per attention
    window and LoRA on/off, all built by `warm_up`); prefill stays eager."""

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
        device = model.home_device
        self.device = device
        rows = self.max_rows
        # Per-row state, indexed by cache row.
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)  # next position to write
        self.last_tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.steps = torch.zeros(rows, dtype=torch.int64, device=device)  # tokens sampled so far
        # LoRA slot of each row; null_slot = no adapter (exactly the base model).
        self.slots = torch.full((rows,), self.null_slot, dtype=torch.int64, device=device)

    def reset_row(self, row: int, params: SamplingParams, seed: int, slot: int | None = None) -> None:
        if slot is not None and (self.bank is None or not 0 <= slot < self.bank.num_slots):
            raise ValueError(f"LoRA slot {slot} does not exist")
        self.slots[row] = self.null_slot if slot is None else slot
        self.positions[row] = 0
        self.last_tokens[row] = 0
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seeds[row] = seed
        self.steps[row] = 0

    def free_row(self, row: int, used: int = 1) -> None:
        """`used`: positions the row's sequence may have written (its prompt and output tokens);
        they are zeroed so nothing it computed, NaN included, reaches the row's next sequence."""
        assert self.model.cache is not None
        self.model.cache.clear_row(row, used)
        # A free row still runs inside decode batches; position 0 keeps its mask non-empty.
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

    def _lora(self, active: torch.Tensor, forward_slots: torch.Tensor) -> LoraBatch | None:
        """Routing for the forward's rows # [B]; None (base path only) when none of the rows that
        matter (`active` slots) uses an adapter."""
        if self.bank is None or bool((active == self.null_slot).all()):
            return None
        return self.bank.batch(forward_slots)

    @torch.inference_mode()
    def prefill(self, row: int, token_ids: list[int], *, start: int, last: bool) -> int | None:
        """Write `token_ids` at positions start.. of `row`; on the last chunk, sample its first token."""
        n = len(token_ids)
        tokens = torch.tensor([token_ids], dtype=torch.int64, device=self.device)  # [1, S]
        positions = torch.arange(start, start + n, device=self.device)[None, :]  # [1, S]
        slots = self.slots[row : row + 1]
        lora = self._lora(slots, slots)
        hidden = self.model(tokens, positions, row_start=row, kv_len=kv_bucket(start + n, self.max_len), lora=lora)
        self.positions[row] = start + n
        if not last:
            return None
        logits = self.model.logits(hidden[:, -1])  # [1, V]
        token = self._sample(logits, torch.tensor([row], device=self.device))
        return int(token[0])

    @property
    def recompilations(self) -> int:
        """Graphs compiled after warm-up (0 in steady state; always 0 without compile)."""
        return self.compile_counter.graphs - self.warm_graphs

    def _forward(self, rows: int, kv_len: int, lora: LoraBatch | None) -> torch.Tensor:
        """One decode token for cache rows [0, rows): hidden # [rows, hidden]. Under compile the
        decoder layers run as one compiled graph per (window, LoRA on/off), shared by all layers."""
        tokens = self.last_tokens[:rows, None]  # [rows, 1]
        positions = self.positions[:rows, None]
        hidden = self.model(tokens, positions, row_start=0, kv_len=kv_len, lora=lora, layer_fn=self._layer_fn)
        return hidden[:, 0]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the fixed-shape decode once per attention window, with and without LoRA, so that
        every graph is compiled before the server reports ready. Leaves all rows free."""
        if not self.compiled:
            return
        variants: list[LoraBatch | None] = [None]
        if self.bank is not None:
            variants.append(self.bank.batch(self.slots))
        for kv_len in kv_buckets(self.max_len):
            for lora in variants:
                self._forward(self.max_rows, kv_len, lora)
        for row in range(self.max_rows):
            self.free_row(row)
        self.warm_graphs = self.compile_counter.graphs

    @torch.inference_mode()
    def decode(self, rows: list[int]) -> list[int]:
        """One token for each of `rows` (all already prefilled)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)  # [n]
        kv_len = kv_bucket(int(self.positions[index].max()) + 1, self.max_len)
        batch = self.max_rows if self.fixed_rows else row_bucket(max(rows) + 1, self.max_rows)
        hidden = self._forward(batch, kv_len, self._lora(self.slots[index], self.slots[:batch]))  # [B, hidden]
        if self.fixed_rows:  # an unpacked lm_head's kernel depends on the row count too: all rows
            logits = self.model.logits(hidden)[index]  # [n, V]
        else:
            logits = self.model.logits(hidden[index])
        self.positions[index] += 1
        return self._sample(logits, index).tolist()

    def _sample(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each row's next token, or NON_FINITE for a row whose logits hold NaN or inf (read back
        with the tokens: no extra device sync). A row's sum is non-finite exactly when one of its
        logits is (finite logits cannot add up past float32's range): one cheap reduction, a
        thirtieth of the cost of isfinite over the whole [n, V] tensor."""
        tokens = sample(
            logits,
            temperature=self.temperature[index],
            top_k=self.top_k[index],
            top_p=self.top_p[index],
            seeds=self.seeds[index],
            steps=self.steps[index],
        )  # [n]
        tokens = torch.where(torch.isfinite(logits.sum(dim=-1)), tokens, NON_FINITE)  # [n]
        self.steps[index] += 1
        self.last_tokens[index] = tokens.clamp(min=0)  # such a row is ended by the engine anyway
        return tokens
