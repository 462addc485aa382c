"""The engine's use of the KV block pool: blocks for each sequence as it grows, prefix-cache
lookups when a request starts, and what a finished chunk makes shareable (engine thread only).

Prefix hits keep a request's numbers exactly those of a cold run: a hit covers whole prompt
chunks only (multiples of the engine's chunk size, which is what fixes chunk boundaries), and only
blocks computed inside full-size chunks are offered to others, under keys that include the LoRA
rank window they were computed with. So a request resumed from cached blocks runs the very
chunks, with the very inputs, that it would have run cold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.catalog import key_name
from server.kv_blocks import BlockHash, BlockPool, PrefixStats, block_hashes
from server.sequence import Sequence


@dataclass
class KVStats:
    """What /metrics and /ready report of the pool (a copy, published each step)."""

    block_size: int
    blocks_total: int
    blocks_used: int = 0
    blocks_cached: int = 0
    preemptions: int = 0
    prefix: PrefixStats = field(default_factory=PrefixStats)

    def as_dict(self) -> dict[str, object]:
        queries, hits = self.prefix.queries, self.prefix.hits
        return {
            "block_size": self.block_size, "blocks_total": self.blocks_total, "blocks_used": self.blocks_used,
            "blocks_cached": self.blocks_cached, "preemptions": self.preemptions,
            "prefix_cache_queries": dict(queries), "prefix_cache_hits": dict(hits),
            "prefix_cache_hit_rate": {name: round(hits.get(name, 0) / q, 4) for name, q in queries.items() if q},
        }


class EngineBlocks:
    def __init__(self, pool: BlockPool, *, chunk_size: int, watermark: float = 0.01, base_name: str = "base",
                 lora_window: Callable[[], int] = lambda: 0) -> None:
        """`base_name`: how statistics name requests without an adapter (the served model name).
        `lora_window`: the LoRA rank window the model computes now (it follows the largest
        loaded rank, and an adapter's keys and values depend on it in their last bits), part of
        an adapter prefix's key so that a hit stays bit-identical to a cold run."""
        self.pool = pool
        self.lora_window = lora_window
        self.base_name = base_name
        self.block_size = pool.block_size
        # A hit is a whole number of chunks and of blocks (see the module docstring).
        self.hit_unit = math.lcm(chunk_size, pool.block_size)
        self.chunk_size = chunk_size
        # Blocks admission leaves free, so running sequences can grow without preempting at once.
        self.watermark = max(1, math.ceil(watermark * pool.num_blocks)) if pool.num_blocks > 1 else 0
        self.preemptions = 0
        self.prefix = PrefixStats()

    # ---- admission -------------------------------------------------------------------------
    def _hashes(self, seq: Sequence) -> list[BlockHash]:
        """Chained hashes of the sequence's full prefill blocks, computed once per prefill."""
        if seq.block_hashes is None:
            seq.hash_window = self._window(seq)
            request = seq.request
            # The adapter versions, the rank window they are computed at and their weights decide its
            # keys and values.
            uses = "+".join(use.key if use.weight == 1.0 else f"{use.key}*{use.weight!r}" for use in request.uses)
            key = f"{uses}#{seq.hash_window}" if uses else None
            seq.block_hashes = list(block_hashes(key, seq.prefill_ids, self.block_size))
        return seq.block_hashes

    def _window(self, seq: Sequence) -> int:
        return self.lora_window() if seq.request.uses else 0

    def _hit(self, seq: Sequence) -> int:
        """Cached leading blocks the sequence may use: whole hit units, and at least the last
        prefill token left to compute (its logits give the next token). 0 for a request
        that scores its prompt (prompt logprobs need every position's logits)."""
        if seq.request.sampling.prompt_logprobs is not None and not seq.output_ids:
            return 0
        tokens = min(self.pool.peek(self._hashes(seq)) * self.block_size, seq.prefill_len - 1)
        return tokens // self.hit_unit * self.hit_unit // self.block_size

    def can_start(self, seq: Sequence) -> bool:
        """Whether the pool holds the sequence's prefill (less what the prefix cache has) and
        still keeps the watermark free."""
        needed = self.pool.blocks_for(seq.prefill_len) - self._hit(seq)
        return needed + self.watermark <= self.pool.available or (
            self.pool.used == 0 and needed <= self.pool.available)

    def start(self, seq: Sequence) -> None:
        """Give the sequence its cached prefix blocks (their positions count as prefilled)."""
        seq.blocks = self.pool.match(self._hashes(seq)[: self._hit(seq)])
        seq.prefilled = len(seq.blocks) * self.block_size
        seq.registered = len(seq.blocks)
        name = seq.request.label(self.base_name, key_name)
        self.prefix.add(name, seq.prefill_len, seq.prefilled)

    # ---- growth ----------------------------------------------------------------------------
    def reserve(self, seq: Sequence, positions: int) -> bool:
        """Blocks for positions [0, positions) of the sequence; False (nothing taken) if the pool
        cannot give them."""
        missing = self.pool.blocks_for(positions) - len(seq.blocks)
        if missing <= 0:
            return True
        got = self.pool.allocate(missing)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def prefilled(self, seq: Sequence) -> None:
        """After a chunk: offer the blocks now computed inside full-size chunks to the cache."""
        hashes = self._hashes(seq)
        full_chunks_end = seq.prefill_len // self.chunk_size * self.chunk_size
        done = min(seq.prefilled, full_chunks_end) // self.block_size
        if self._window(seq) == seq.hash_window:  # else computed under another window than its keys say
            for i in range(seq.registered, done):
                self.pool.register(seq.blocks[i], hashes[i], seq.request.adapter_keys)
        seq.registered = max(seq.registered, done)

    def release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.registered = 0

    def preempted(self, seq: Sequence) -> None:
        """The sequence gave its blocks back (released) to let older ones grow; it will recompute."""
        seq.preempt()
        self.preemptions += 1

    def forget_adapter(self, key: str) -> None:
        self.pool.forget_adapter(key)

    def stats(self) -> KVStats:
        pool = self.pool
        return KVStats(block_size=pool.block_size, blocks_total=pool.num_blocks, blocks_used=pool.used,
                       blocks_cached=pool.cached, preemptions=self.preemptions,
                       prefix=PrefixStats(dict(self.prefix.queries), dict(self.prefix.hits)))
