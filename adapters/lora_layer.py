"""The batched LoRA product that runs inside every targeted projection.

For each row n of a batch, on slot k = slot[n]:  y[n] += B_k @ (A_k @ x[n])  (scaling folded in B_k)

Slot tensors are slot-major (`a` # [K+1, R, P, in], `b` # [K+1, R, out_p]), so the first `window`
ranks of one slot are a plain view and the first `window` ranks of all slots are one strided view.
A forward's tokens (server/forward_batch.py) are a decode block, one token per row, then prompt
chunks of one row each. Three formulations, picked by `SlotBank.route`:

* chunked (eager decode): rows are grouped by slot into chunks of exactly CHUNK rows (a short
  group is padded by repeating one of its rows; padding results are dropped). Each chunk gets a
  contiguous copy of its slot's A and B (kept across steps while the chunks' slots, the window
  and the bank are unchanged), then two batched matmuls compute all chunks. Only a row's own
  adapter is computed, with a handful of ops per projection whatever the number of adapters.
  (`bench/lora_formulations.py` measured the alternatives.)
* segment (prompt chunks): each chunk's tokens against its slot's A and B, which are views;
  plain matmuls over the chunk's tokens. The cost follows the tokens, not the number of slots.
* dense (compiled decode): every row against every slot, masked by a one-hot: fixed shapes, so
  the compiled graph never changes with what is loaded or who uses it.

Batch invariance: a row's delta is bit-identical whichever rows share its step. Chunked: every
product is a CHUNK-row matmul (the kernel a matmul picks depends on its row count, so it is held
fixed) and rows of a chunk never mix. Dense: batched matmuls with one product per row.
Segment: a prompt chunk's boundaries are fixed by the engine whatever else is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

CHUNK = 4  # rows per chunked product; >= 4 keeps the matmul on one kernel family on CPUs


@dataclass(frozen=True)
class ChunkPlan:
    """Where each row of a decode batch goes in the chunked product (built once per step)."""

    gather: torch.Tensor  # [chunks * CHUNK] batch row feeding each chunk position
    slots: torch.Tensor  # [chunks] slot of each chunk
    keep: torch.Tensor  # [n] chunk positions holding real rows (not padding)
    rows: torch.Tensor  # [n] the batch row of each of those positions
    slot_key: tuple[int, ...]  # `slots` as Python ints: what the gathered weights depend on

    def to(self, device: torch.device) -> ChunkPlan:
        return ChunkPlan(self.gather.to(device), self.slots.to(device), self.keep.to(device), self.rows.to(device),
                         self.slot_key)


Segment = tuple[int, int, int]  # (first flat token, tokens, slot) of a prompt chunk on a real slot


@dataclass(frozen=True)
class LoraBatch:
    """Per-forward LoRA routing over the forward's flat tokens (server/forward_batch.py): the
    decode block, flat tokens [0, decode_tokens), goes by `onehot` (dense) or `chunks`
    (chunked); each prompt chunk on a real slot is a `segment` computed with that slot's weights
    alone. Rows on the null slot cost nothing."""

    window: int  # ranks computed per slot (a power of two <= the slot rank)
    null_slot: int
    version: int = 0  # the slot bank's write counter: gathered slot weights older than it are stale
    decode_tokens: int = 0
    row_slots: tuple[int, ...] = ()  # slot of each decode-block row
    onehot: torch.Tensor | None = None  # [D, K+1] in the model dtype; the last column is the null slot
    chunks: ChunkPlan | None = None
    segments: tuple[Segment, ...] = ()

    def to(self, device: torch.device) -> LoraBatch:
        onehot = None if self.onehot is None else self.onehot.to(device)
        chunks = None if self.chunks is None else self.chunks.to(device)
        return replace(self, onehot=onehot, chunks=chunks)

    def per_row_tokens(self, tokens: int) -> LoraBatch:
        """The same rows' routing when each of them carries `tokens` prompt tokens instead of one
        decode token: one segment per row on a real slot."""
        segments = tuple((i * tokens, tokens, slot) for i, slot in enumerate(self.row_slots) if slot != self.null_slot)
        return replace(self, decode_tokens=0, onehot=None, chunks=None, segments=segments)


def plan_chunks(slots: list[int], null_slot: int, device: torch.device) -> ChunkPlan:
    """Group the rows that use an adapter by slot, in CHUNK-row chunks (slot order, row order)."""
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot != null_slot:
            by_slot.setdefault(slot, []).append(row)
    gather: list[int] = []
    chunk_slots: list[int] = []
    keep: list[int] = []
    rows: list[int] = []
    for slot in sorted(by_slot):
        members = by_slot[slot]
        for i in range(0, len(members), CHUNK):
            chunk = members[i : i + CHUNK]
            keep.extend(range(len(gather), len(gather) + len(chunk)))
            rows.extend(chunk)
            gather.extend(chunk + [chunk[0]] * (CHUNK - len(chunk)))
            chunk_slots.append(slot)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ChunkPlan(tensor(gather), tensor(chunk_slots), tensor(keep), tensor(rows), tuple(chunk_slots))


def gather_chunk_weights(
    a: torch.Tensor, bs: list[torch.Tensor], slots: torch.Tensor, window: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each chunk's slot weights, laid out for the two products: A as # [chunks, in, P*w] (part-major,
    so that each part's slice of the shrink result has unit stride: a strided slice made CPU bmm
    copy it row by row, 4x slower) and every part's B # [chunks, w, out_p], all contiguous."""
    chunks = slots.shape[0]
    d_in = a.shape[-1]
    a_sel = a[:, :window].index_select(0, slots)  # [chunks, w, P, in]
    a_t = a_sel.permute(0, 3, 2, 1).reshape(chunks, d_in, -1)  # [chunks, in, P*w], a copy
    return a_t, [b[:, :window].index_select(0, slots) for b in bs]


def lora_chunked(x: torch.Tensor, a_t: torch.Tensor, b_sel: list[torch.Tensor], plan: ChunkPlan) -> torch.Tensor:
    """x # [T, in] (the plan's rows index its decode block), the chunks' gathered weights ->
    deltas of the planned rows # [n, out] (parts concatenated)."""
    chunks, d_in, _ = a_t.shape
    window = b_sel[0].shape[1]
    xs = x.index_select(0, plan.gather).view(chunks, CHUNK, d_in)  # [chunks, C, in]
    h = torch.bmm(xs, a_t).view(chunks, CHUNK, len(b_sel), window)  # [chunks, C, P, w]
    deltas = [torch.bmm(h[:, :, p], b) for p, b in enumerate(b_sel)]
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)  # [chunks, C, out]
    return delta.view(-1, delta.shape[-1]).index_select(0, plan.keep)  # [n, out]


def lora_single(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], slot: int, window: int) -> torch.Tensor:
    """x # [n, in], every token on `slot` -> delta # [n, out]."""
    _, _, parts, d_in = a.shape
    a_slot = a[slot, :window].reshape(window * parts, d_in)  # [w*P, in], a view
    h = torch.matmul(x, a_slot.t()).unflatten(-1, (window, parts))  # [n, w, P]
    deltas = [torch.matmul(h[..., p], b[slot, :window]) for p, b in enumerate(bs)]
    return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, onehot: torch.Tensor, window: int) -> torch.Tensor:
    """Dense: x # [B, S, in]; a # [K+1, R, P, in]; onehot # [B, K+1] -> masked h # [B, S, K+1, window, P]"""
    batch, seq, d_in = x.shape
    slots, _, parts, _ = a.shape
    a_view = a[:, :window].reshape(-1, d_in)  # [(K+1)*window*P, in]; a view when window == R
    h = torch.bmm(x, a_view.t().expand(batch, -1, -1))  # [B, S, (K+1)*window*P]
    h = h.view(batch, seq, slots, window, parts)
    # where, not a multiply: another slot's product may overflow to inf on this row's input, and
    # inf x 0 is NaN; only the row's own slot may reach its output.
    return torch.where(onehot[:, None, :, None, None] != 0, h, 0.0)


def lora_expand(h: torch.Tensor, b: torch.Tensor, part: int) -> torch.Tensor:
    """Dense: h # [B, S, K+1, window, P]; b # [K+1, R, out_p] -> delta of part `part` # [B, S, out_p]"""
    batch, seq, slots, window, _ = h.shape
    rows = h[..., part].reshape(batch, seq, slots * window)  # [B, S, (K+1)*window]
    b_view = b[:, :window].reshape(slots * window, -1)  # [(K+1)*window, out_p]
    return torch.bmm(rows, b_view.expand(batch, -1, -1))  # [B, S, out_p]


class LoraSlots(nn.Module):
    """Read-only view of one fused projection's slot tensors (the SlotBank writes them).

    `a` # [K+1, R, P, in]; `bs[p]` # [K+1, R, out_p] for each of the P projections fused in the
    module, in the order their outputs tile the module's output features.
    """

    def __init__(self, a: torch.Tensor, bs: list[torch.Tensor]) -> None:
        super().__init__()
        self.a = a
        self.bs = bs
        # The last chunks' gathered weights, keyed by (chunk slots, window, bank version): decode
        # steps keep the same plan while no request joins or leaves, and the gather (a copy of
        # every chunk's A and B) was a third of the LoRA cost per step. At most K chunks are kept,
        # so this holds no more than the slots themselves.
        self._gathered: tuple[tuple[object, ...], torch.Tensor, list[torch.Tensor]] | None = None

    def chunk_weights(self, plan: ChunkPlan, window: int, version: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = (plan.slot_key, window, version)
        if self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1], self._gathered[2]
        a_sel, b_sel = gather_chunk_weights(self.a, self.bs, plan.slots, window)
        self._gathered = (key, a_sel, b_sel) if len(plan.slot_key) < self.a.shape[0] else None
        return a_sel, b_sel

    def add_to(self, y: torch.Tensor, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """y # [T, out] + every part's delta for x # [T, in]."""
        d = lora.decode_tokens
        if lora.onehot is not None:
            h = lora_shrink(x[:d, None], self.a, lora.onehot, lora.window)  # [D, 1, K+1, window, P]
            deltas = [lora_expand(h, b, p) for p, b in enumerate(self.bs)]
            # Parts tile the output in order (q|k|v, gate|up), so one cat gives the full delta.
            delta = (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1))[:, 0]  # [D, out]
            y = y + delta if d == y.shape[0] else torch.cat([y[:d] + delta, y[d:]])
        elif lora.chunks is not None:
            a_sel, b_sel = self.chunk_weights(lora.chunks, lora.window, lora.version)
            y = y.index_add(0, lora.chunks.rows, lora_chunked(x, a_sel, b_sel, lora.chunks))
        for offset, length, slot in lora.segments:  # y is this forward's own tensor: add in place
            y[offset : offset + length] += lora_single(x[offset : offset + length], self.a, self.bs, slot, lora.window)
        return y
