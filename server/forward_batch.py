"""What one model forward computes: every token scheduled in an engine step, flat.

The engine decides on the host which rows decode and which prompt chunks are prefilled; this
module turns that into the tensors the model reads, built once per step and shared by every
layer, so that nothing inside the forward reads a device tensor back.

Flat token order: first the decode block, one token for each of the rows [0, D) of the runner
(a row is a running sequence's sampling state; its keys and values live in the blocks of its
block table, server/kv_cache.py), then each prompt chunk's tokens. A row of the decode block that
is not decoding this step (free, or still prefilling) is padding: it computes on its own, attends
to nothing (length 0) and its keys and values go to the cache's scratch block, which nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from server.kv_cache import blocks_for

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch


def causal_mask(positions: torch.Tensor, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """positions # [B, S] -> which cache positions each query may attend to # [B, 1, S, kv_len] bool"""
    keys = torch.arange(kv_len, device=positions.device)  # [kv_len]
    query = positions[:, :, None]  # [B, S, 1]
    mask = keys[None, None, :] <= query  # [B, S, kv_len]
    if sliding_window is not None:
        mask = mask & (query - keys[None, None, :] < sliding_window)
    return mask[:, None]


@dataclass(frozen=True)
class PrefillChunk:
    """Consecutive prompt tokens of one row: flat tokens [offset, offset + length)."""

    row: int
    offset: int
    length: int
    kv_len: int  # cache positions its attention reads (covers start + length)
    masks: tuple[torch.Tensor, ...]  # per distinct attention window of the model: [1, 1, length, kv_len] bool
    kv_slots: torch.Tensor  # [kv_len] int64, pool slot of each position read (past the end: zero block)


@dataclass(frozen=True)
class ForwardBatch:
    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    write_slots: torch.Tensor  # [T] int64, pool slot each token's key and value go to
    decode_rows: int  # D: flat tokens [0, D) are the decode block, rows [0, D)
    block_size: int  # positions per KV block
    decode_tables: torch.Tensor | None = None  # [D, blocks] int64, each decode row's block table
    decode_lengths: torch.Tensor | None = None  # [D] int64, positions each attends (0: padding)
    chunks: tuple[PrefillChunk, ...] = ()
    lora: LoraBatch | None = None
    # Tokens looked up in a module slot's embedding (modules_to_save): (flat index [n], slot *
    # max_vocab [n]); None: every token reads the base embedding.
    embed_copies: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> ForwardBatch:
        """The same batch on another device (a device-map boundary)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            tokens=move(self.tokens),
            positions=move(self.positions),
            write_slots=move(self.write_slots),
            decode_tables=move(self.decode_tables),
            decode_lengths=move(self.decode_lengths),
            chunks=tuple(replace(c, masks=tuple(move(m) for m in c.masks), kv_slots=move(c.kv_slots)) for c in self.chunks),
            lora=None if self.lora is None else self.lora.to(device),
        )


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens of one row to write at positions start.. in a step, as the scheduler sees
    them (host values); on the prompt's last chunk the row's first token is sampled."""

    row: int
    token_ids: Sequence[int]
    start: int
    last: bool


@dataclass(frozen=True)
class CacheLayout:
    """What the batch builder needs to know of the KV pool (server/kv_cache.py)."""

    block_size: int
    scratch_block: int  # where padding tokens write
    zero_block: int  # always zero: what a gathered window reads past a sequence's end

    def slot(self, table: Sequence[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def window_slots(self, table: Sequence[int], end: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """Pool slots of positions [0, kv_len) of a sequence that has written [0, end): its own
        for [0, end), the zero block's first slot after. # [kv_len] int64"""
        blocks = torch.tensor(table[: blocks_for(end, self.block_size)], dtype=torch.int64)  # [b]
        own = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()[:end]  # [end]
        past = torch.full((kv_len - end,), self.zero_block * self.block_size, dtype=torch.int64)
        return torch.cat([own, past]).to(device)


def build_forward_batch(
    *,
    layout: CacheLayout,
    decode_tokens: torch.Tensor | None = None,  # [D] on the device (last sampled tokens)
    decode_positions: Sequence[int] = (),  # D host values (padding rows: 0)
    decode_tables: Sequence[Sequence[int] | None] = (),  # D block tables (padding rows: None)
    table_width: int | None = None,  # block-table columns (fixed under compile); default: the widest needed
    chunks: Sequence[PromptChunk] = (),
    chunk_tables: Sequence[Sequence[int]] = (),  # the block table of each chunk's row
    window: Callable[[int], int],  # cache positions a chunk attends over, from the positions it needs
    windows: Sequence[int | None] = (None,),  # the model's distinct attention windows (None: global)
    device: torch.device,
    lora: LoraBatch | None = None,
) -> ForwardBatch:
    """One host-to-device copy per kind of index; the masks are built here, once per forward."""
    positions: list[int] = list(decode_positions)
    write_slots = [
        layout.scratch_block * layout.block_size if table is None else layout.slot(table, pos)
        for pos, table in zip(decode_positions, decode_tables, strict=True)
    ]
    prompt: list[int] = []
    for chunk, table in zip(chunks, chunk_tables, strict=True):
        prompt.extend(chunk.token_ids)
        span = range(chunk.start, chunk.start + len(chunk.token_ids))
        positions.extend(span)
        write_slots.extend(layout.slot(table, pos) for pos in span)

    def tensor(values: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    position_t = tensor(positions)  # [T]
    parts = [] if decode_tokens is None else [decode_tokens]
    if prompt:
        parts.append(tensor(prompt))
    tokens = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T]
    tables = lengths = None
    if decode_positions:
        needed = [0 if t is None else blocks_for(p + 1, layout.block_size) for p, t in zip(decode_positions, decode_tables)]
        width = table_width or max(max(needed), 1)
        # Columns past a row's last block are never read; the zero block keeps them in range.
        rows = [[*(t or ())[:n], *[layout.zero_block] * (width - n)] for t, n in zip(decode_tables, needed)]
        tables = tensor(rows)  # [D, width]
        lengths = tensor([0 if t is None else p + 1 for p, t in zip(decode_positions, decode_tables)])  # [D]
    specs = []
    offset = len(decode_positions)
    for chunk, table in zip(chunks, chunk_tables):
        n, end = len(chunk.token_ids), chunk.start + len(chunk.token_ids)
        kv_len = window(end)
        masks = tuple(causal_mask(position_t[None, offset : offset + n], kv_len, w) for w in windows)
        specs.append(PrefillChunk(row=chunk.row, offset=offset, length=n, kv_len=kv_len, masks=masks,
                                  kv_slots=layout.window_slots(table, end, kv_len, device)))
        offset += n
    return ForwardBatch(
        tokens=tokens, positions=position_t, write_slots=tensor(write_slots), decode_rows=len(decode_positions),
        block_size=layout.block_size, decode_tables=tables, decode_lengths=lengths, chunks=tuple(specs), lora=lora,
    )
