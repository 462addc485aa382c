"""What one model forward computes: every token scheduled in an engine step, flat.

The engine decides on the host which rows decode and which prompt chunks are prefilled; this
module turns that into the tensors the model reads, built once per step and shared by every
layer, so that nothing inside the forward reads a device tensor back.

Flat token order: first the decode block, one token for each of the contiguous cache rows
[decode_start, decode_start + D) (contiguous so that decode attention reads the cache as a view,
not a gathered copy), then each prompt chunk's tokens. A row of the decode block that is not
decoding this step (free, or still prefilling) is padding: it computes on its own and its keys
and values go to the cache's scratch row, never to a row that anyone reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

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
class DecodeSpan:
    """Consecutive rows of the decode block that attend over the same window: block rows
    [start, end), cache positions [0, kv_len)."""

    start: int
    end: int
    kv_len: int
    mask: torch.Tensor  # [end - start, 1, 1, kv_len] bool


@dataclass(frozen=True)
class PrefillChunk:
    """Consecutive prompt tokens of one row: flat tokens [offset, offset + length)."""

    row: int
    offset: int
    length: int
    kv_len: int  # cache positions its attention reads (covers start + length)
    mask: torch.Tensor  # [1, 1, length, kv_len] bool


@dataclass(frozen=True)
class ForwardBatch:
    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its row
    write_rows: torch.Tensor  # [T] int64, cache row each token's key and value go to
    decode_start: int
    decode_rows: int  # D: flat tokens [0, D) are the decode block
    decode_spans: tuple[DecodeSpan, ...] = ()  # cover [0, D) in order
    chunks: tuple[PrefillChunk, ...] = ()
    lora: LoraBatch | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> ForwardBatch:
        """The same batch on another device (a device-map boundary)."""
        move = lambda t: t.to(device)  # noqa: E731
        return replace(
            self,
            tokens=move(self.tokens),
            positions=move(self.positions),
            write_rows=move(self.write_rows),
            decode_spans=tuple(replace(span, mask=move(span.mask)) for span in self.decode_spans),
            chunks=tuple(replace(c, mask=move(c.mask)) for c in self.chunks),
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


def decode_spans(windows: Sequence[int | None], max_spans: int) -> list[tuple[int, int, int]]:
    """Split a decode block into runs of consecutive rows by attention window, (start, end,
    kv_len) each, so short rows do not attend over the longest row's window. `windows[r]`: the
    window row r needs (None: a padding row, which joins whichever run it is in). More than
    `max_spans` runs become one run over the widest window (each run is a call per layer)."""
    spans: list[list[int | None]] = []  # [start, end, window or None while only padding]
    for row, window in enumerate(windows):
        last = spans[-1] if spans else None
        if last is not None and (window is None or last[2] is None or last[2] == window):
            last[1] = row + 1
            if last[2] is None:
                last[2] = window
        else:
            spans.append([row, row + 1, window])
    widest = max((w for w in windows if w is not None), default=None)
    if widest is None:
        return []
    if len(spans) > max_spans:
        return [(0, len(windows), widest)]
    return [(int(start), int(end), widest if window is None else int(window))  # type: ignore[arg-type]
            for start, end, window in spans]


def build_forward_batch(
    *,
    decode_start: int = 0,
    decode_tokens: torch.Tensor | None = None,  # [D] on the device (last sampled tokens)
    decode_positions: Sequence[int] = (),  # D host values
    decode_write_rows: Sequence[int] = (),  # D host values (padding rows: the scratch row)
    spans: Sequence[tuple[int, int, int]] = (),  # (start, end, kv_len) runs covering the decode block
    chunks: Sequence[PromptChunk] = (),
    window: Callable[[int], int],  # cache positions a chunk attends over, from the positions it needs
    sliding_window: int | None,
    device: torch.device,
    lora: LoraBatch | None = None,
) -> ForwardBatch:
    """One host-to-device copy per kind of index; the masks are built here, once per forward."""
    positions: list[int] = list(decode_positions)
    write_rows: list[int] = list(decode_write_rows)
    prompt: list[int] = []
    for chunk in chunks:
        prompt.extend(chunk.token_ids)
        positions.extend(range(chunk.start, chunk.start + len(chunk.token_ids)))
        write_rows.extend([chunk.row] * len(chunk.token_ids))

    def tensor(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    position_t = tensor(positions)  # [T]
    parts = [] if decode_tokens is None else [decode_tokens]
    if prompt:
        parts.append(tensor(prompt))
    tokens = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T]
    decode = tuple(
        DecodeSpan(start, end, kv_len, causal_mask(position_t[start:end, None], kv_len, sliding_window))
        for start, end, kv_len in spans
    )
    specs = []
    offset = len(decode_positions)
    for chunk in chunks:
        n, kv_len = len(chunk.token_ids), window(chunk.start + len(chunk.token_ids))
        mask = causal_mask(position_t[None, offset : offset + n], kv_len, sliding_window)
        specs.append(PrefillChunk(row=chunk.row, offset=offset, length=n, kv_len=kv_len, mask=mask))
        offset += n
    return ForwardBatch(
        tokens=tokens, positions=position_t, write_rows=tensor(write_rows), decode_start=decode_start,
        decode_rows=len(decode_positions), decode_spans=decode, chunks=tuple(specs), lora=lora,
    )
