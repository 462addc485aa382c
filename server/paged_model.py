"""What every model the engine drives shares: a KV block pool, the block table of a row that owns
a fixed share of it, and a direct forward over rows of tokens (tests and tools; the engine builds
its ForwardBatch itself). The native model (server/model.py) and the transformers-backed one
(server/hf_model.py) differ only in how `forward_batch` computes the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from server.forward_batch import CacheLayout, ForwardBatch, PromptChunk, build_forward_batch
from server.kv_cache import KVCache, blocks_for
from server.model_config import ModelConfig

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch


class PagedModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache: KVCache | None = None
        self._max_rows = 0  # sequences decoded together (set by allocate())
        self.max_len = 0  # positions per sequence (set by allocate())

    @property
    def max_rows(self) -> int:
        """Sequences one decode step carries at most (0 before allocate())."""
        return self._max_rows

    def forward_batch(self, batch: ForwardBatch, layer_fn: object = None) -> torch.Tensor:
        """Every token of `batch` through the model -> final hidden states # [T, hidden]."""
        raise NotImplementedError

    def allocate_cache(
        self, *, max_rows: int, max_len: int, num_blocks: int | None, block_size: int, dtype: torch.dtype,
        layer_devices: list[torch.device],
    ) -> None:
        """The KV pool: `num_blocks` blocks of `block_size` positions (default: enough for
        `max_rows` sequences of `max_len` positions each, the layout the direct `forward` uses)."""
        cfg = self.cfg
        if num_blocks is None:
            num_blocks = max_rows * blocks_for(max_len, block_size)
        self._max_rows, self.max_len = max_rows, max_len
        self.cache = KVCache(
            num_layers=cfg.num_hidden_layers, num_blocks=num_blocks, block_size=block_size,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype, layer_devices=layer_devices,
        )

    def cache_layout(self) -> CacheLayout:
        if self.cache is None:
            raise RuntimeError("call allocate() first")
        return CacheLayout(self.cache.block_size, self.cache.scratch_block, self.cache.zero_block)

    def fixed_share(self, row: int) -> list[int]:
        """Blocks [row * M, (row + 1) * M), M = the blocks of a max_len sequence: the table of a
        row that owns a fixed share of the pool (the direct `forward`, tools and tests that drive
        the runner without an engine)."""
        assert self.cache is not None
        share = blocks_for(self.max_len, self.cache.block_size)
        if (row + 1) * share > self.cache.num_blocks:
            raise ValueError(f"row {row} has no fixed share of a pool of {self.cache.num_blocks} KV blocks")
        return list(range(row * share, (row + 1) * share))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S] int64
        positions: torch.Tensor,  # [B, S] int64, absolute position of each token in its row
        *,
        row_start: int,
        kv_len: int,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """B rows from `row_start`, S tokens each -> hidden # [B, S, hidden]: one token per row is
        a decode block, longer rows are prompt chunks (a direct way in for tests and tools; the
        engine builds its ForwardBatch itself). Row r uses the blocks [r * M, (r + 1) * M), M =
        max_len / block_size, as if each row owned a fixed share of the pool. `lora`: from
        SlotBank.batch over the B rows."""
        layout = self.cache_layout()
        batch, seq = tokens.shape
        tables = [self.fixed_share(r) for r in range(row_start, row_start + batch)]
        host_positions = positions.tolist()
        common = {"window": lambda needed: kv_len, "windows": self.cfg.windows,
                  "device": tokens.device, "layout": layout}
        if seq == 1:
            fb = build_forward_batch(
                decode_tokens=tokens[:, 0], decode_positions=[p[0] for p in host_positions], decode_tables=tables,
                lora=lora, **common,
            )
        else:
            chunks = [PromptChunk(row, ids, pos[0], last=False)
                      for row, ids, pos in zip(range(batch), tokens.tolist(), host_positions)]
            fb = build_forward_batch(chunks=chunks, chunk_tables=tables,
                                     lora=None if lora is None else lora.per_row_tokens(seq), **common)
        return self.forward_batch(fb).view(batch, seq, -1)

