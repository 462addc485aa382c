"""The batched LoRA product that runs inside every targeted projection.

For each row n of a batch, on slot k = slot[n]:  y[n] += B_k @ (A_k @ x[n])  (scaling folded in B_k)

A row may add several slots, each with a weight (a request's `lora_scale`, or a weighted mix of
adapters): y[n] += sum_j w_j B_kj A_kj x[n], which is PEFT's `add_weighted_adapter(...,
combination_type="cat")`. A DoRA slot also rescales the row's output per channel by its
s_k = m / ||W + B A|| (adapters/dora.py): y[n] = y_base[n] + (s_k - 1)(y_base[n] - bias) + s_k B_k A_k x[n];
every other slot has s = 1, so its rows are untouched by that.

Slot tensors are slot-major (`a` # [K+1, R, P, in], `b` # [K+1, R, out_p]), so the first `window`
ranks of one slot are a plain view and the first `window` ranks of all slots are one strided view.
A forward's tokens (server/forward_batch.py) are a decode block, one token per row, then prompt
chunks of one row each. Three formulations, picked by `SlotBank.route`:

* rows (eager decode): every decode row keeps a copy of its slot's A and B of its own
  (row-resident, written by `SlotBank.route` when the row's slot or that slot's contents change,
  so a step gathers nothing however often requests join and leave); each row is one product with
  its own weights, a batched matrix-vector product whose cost follows the rows that use adapters,
  not the number of slots. When few rows of the block use adapters only theirs are gathered;
  otherwise the whole block runs, rows on the null slot holding zeros. (Measured against a
  chunked formulation, which grouped rows by slot into 4-row products: at batch 32 the rows form
  cost 0.73x of the base step with 32 distinct adapters against 0.55x, and 0.75x against 0.84x
  with 8 adapters of 4 rows each; and the chunked form re-gathered every chunk's weights whenever
  the set of adapters in the batch changed.)
* segment (prompt chunks): each chunk's tokens against its slot's A and B, which are views;
  plain matmuls over the chunk's tokens. The cost follows the tokens, not the number of slots.
* dense (compiled decode): every row against every slot, weighted by a [rows, slots] mix (a one-hot
  times the scale for one adapter): fixed shapes, so the compiled graph never changes with what
  is loaded, who uses it, or how rows mix adapters.

Eager decode rows that mix several adapters run together in the dense formulation, restricted
to those rows (`mixed_rows`): one batched product per row over every slot, weighted.

Batch invariance: a row's delta is bit-identical whichever rows share its step. Rows: every
product has one row (the kernel a matmul picks depends on its row count, so it is held fixed;
gathered or in place, a row's weights are the same numbers). Dense: batched matmuls with one
product per row.
Segment: a prompt chunk's boundaries are fixed by the engine whatever else is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

PADDING = -1  # the "slot" of a decode-block row that is not decoding (its output is dropped)
Segment = tuple[int, int, int, float]  # (first flat token, tokens, slot, weight) of tokens on a real slot
Terms = tuple[tuple[int, float], ...]  # (slot, weight) of each adapter a row adds; () = the base model


@dataclass(frozen=True)
class LoraBatch:
    """Per-forward LoRA routing over the forward's flat tokens (server/forward_batch.py): the
    decode block, flat tokens [0, decode_tokens), goes by `mix` (dense) or by the row-resident
    weights (`rows`); each prompt chunk on a real slot, and each adapter of a decode row that
    mixes several, is a `segment` computed with that slot's weights alone."""

    window: int  # ranks computed per slot (a power of two <= the slot rank)
    null_slot: int
    decode_tokens: int = 0
    row_terms: tuple[Terms, ...] = ()  # what each decode-block row adds (() for the base and padding)
    mix: torch.Tensor | None = None  # [D, K+1] each row's weight per slot, in the model dtype (dense)
    rows: bool = False  # the decode block uses the row-resident weights (LoraSlots.a_rows, b_rows)
    active: torch.Tensor | None = None  # [n] with `rows`: only these block rows (None: all of them)
    segments: tuple[Segment, ...] = ()
    scales: torch.Tensor | None = None  # [D] with `rows`: each row's adapter weight (None: all 1)
    mixed_rows: torch.Tensor | None = None  # [m] eager: decode rows that mix adapters (dense over their `mixed`)
    mixed: torch.Tensor | None = None  # [m, K+1] those rows' weight per slot
    dora_rows: torch.Tensor | None = None  # [D] int64: each decode row's DoRA slot (null: none); None: no row
    dora_slots: frozenset[int] = frozenset()  # slots holding a DoRA adapter (for segments)

    def to(self, device: torch.device) -> LoraBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, mix=move(self.mix), active=move(self.active), scales=move(self.scales),
                       mixed_rows=move(self.mixed_rows), mixed=move(self.mixed), dora_rows=move(self.dora_rows))

    def per_row_tokens(self, tokens: int) -> LoraBatch:
        """The same rows' routing when each of them carries `tokens` prompt tokens instead of one
        decode token: one segment per row and adapter."""
        segments = tuple((i * tokens, tokens, slot, weight) for i, terms in enumerate(self.row_terms)
                         for slot, weight in terms)
        return replace(self, decode_tokens=0, row_terms=(), mix=None, rows=False, active=None, segments=segments,
                       scales=None, mixed_rows=None, mixed=None, dora_rows=None)


def dora_rescale(y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> None:
    """In place: y + (s - 1) * (y - bias), DoRA's per-channel rescaling of the base output (the
    bias itself is not rescaled). y # [n, out]; s # [n, out] or [out]"""
    base = y if bias is None else y - bias
    y.add_((s - 1) * base)


def lora_single(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], slot: int, window: int) -> torch.Tensor:
    """x # [n, in], every token on `slot` -> delta # [n, out]."""
    _, _, parts, d_in = a.shape
    a_slot = a[slot, :window].reshape(window * parts, d_in)  # [w*P, in], a view
    h = torch.matmul(x, a_slot.t()).unflatten(-1, (window, parts))  # [n, w, P]
    deltas = [torch.matmul(h[..., p], b[slot, :window]) for p, b in enumerate(bs)]
    return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, mix: torch.Tensor, window: int) -> torch.Tensor:
    """Dense: x # [B, S, in]; a # [K+1, R, P, in]; mix # [B, K+1] -> weighted h # [B, S, K+1, window, P]"""
    batch, seq, d_in = x.shape
    slots, _, parts, _ = a.shape
    a_view = a[:, :window].reshape(-1, d_in)  # [(K+1)*window*P, in]; a view when window == R
    h = torch.bmm(x, a_view.t().expand(batch, -1, -1))  # [B, S, (K+1)*window*P]
    h = h.view(batch, seq, slots, window, parts)
    # where, not a multiply: another slot's product may overflow to inf on this row's input, and
    # inf x 0 is NaN; only the row's own slot may reach its output.
    weights = mix[:, None, :, None, None]
    return torch.where(weights != 0, h * weights, 0.0)


def lora_expand(h: torch.Tensor, b: torch.Tensor, part: int) -> torch.Tensor:
    """Dense: h # [B, S, K+1, window, P]; b # [K+1, R, out_p] -> delta of part `part` # [B, S, out_p]"""
    batch, seq, slots, window, _ = h.shape
    rows = h[..., part].reshape(batch, seq, slots * window)  # [B, S, (K+1)*window]
    b_view = b[:, :window].reshape(slots * window, -1)  # [(K+1)*window, out_p]
    return torch.bmm(rows, b_view.expand(batch, -1, -1))  # [B, S, out_p]


def lora_rows(x: torch.Tensor, a_rows: torch.Tensor, b_rows: list[torch.Tensor]) -> torch.Tensor:
    """Each row against its own weights, one row per product (a fixed row count of 1, whatever
    the batch): x # [n, in]; a_rows # [n, in, P*w]; b_rows[p] # [n, w, out_p] -> # [n, out]"""
    window = b_rows[0].shape[1]
    h = torch.bmm(x[:, None], a_rows)  # [n, 1, P*w]
    deltas = [torch.bmm(h[:, :, p * window : (p + 1) * window], b) for p, b in enumerate(b_rows)]
    return (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1))[:, 0]


class LoraSlots(nn.Module):
    """Read-only view of one fused projection's slot tensors (the SlotBank writes them).

    `a` # [K+1, R, P, in]; `bs[p]` # [K+1, R, out_p] for each of the P projections fused in the
    module, in the order their outputs tile the module's output features; `s` # [K+1, out].
    """

    def __init__(self, a: torch.Tensor, bs: list[torch.Tensor], s: torch.Tensor | None = None) -> None:
        super().__init__()
        self.a = a
        self.bs = bs
        # DoRA's per-channel factor of each slot # [K+1, out]; 1 for every slot without DoRA.
        self.s = torch.ones(a.shape[0], sum(b.shape[-1] for b in bs), dtype=a.dtype, device=a.device) if s is None else s
        # Row-resident weights: a copy of each decode row's slot, written when the row's slot
        # changes (SlotBank.route). a_rows # [rows, in, P*w] is part-major, so that each part's
        # slice of the shrink result has unit stride (a strided slice made CPU bmm copy it row by
        # row, 4x slower); b_rows[p] # [rows, w, out_p].
        self.a_rows: torch.Tensor | None = None
        self.b_rows: list[torch.Tensor] = []

    def allocate_rows(self, rows: int, window: int) -> None:
        parts, d_in = self.a.shape[2], self.a.shape[3]
        like = {"dtype": self.a.dtype, "device": self.a.device}
        self.a_rows = torch.zeros(rows, d_in, parts * window, **like)
        self.b_rows = [torch.zeros(rows, window, b.shape[-1], **like) for b in self.bs]

    def row_views(self, row: int, slot: int, window: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(targets, sources) that copy `slot`'s first `window` ranks into `row`."""
        assert self.a_rows is not None
        parts, d_in = self.a.shape[2], self.a.shape[3]
        a_view = self.a_rows[row].view(d_in, parts, window).permute(2, 1, 0)  # [w, P, in]
        targets = [a_view, *(b[row] for b in self.b_rows)]
        return targets, [self.a[slot, :window], *(b[slot, :window] for b in self.bs)]

    def row_targets(self, row: int) -> list[torch.Tensor]:
        assert self.a_rows is not None
        return [self.a_rows[row], *(b[row] for b in self.b_rows)]

    def dense_delta(self, x: torch.Tensor, mix: torch.Tensor, window: int) -> torch.Tensor:
        """x # [n, in] rows weighted over every slot by mix # [n, K+1] -> delta # [n, out]"""
        h = lora_shrink(x[:, None], self.a, mix, window)  # [n, 1, K+1, window, P], weighted
        deltas = [lora_expand(h, b, p) for p, b in enumerate(self.bs)]
        # Parts tile the output in order (q|k|v, gate|up), so one cat gives the full delta.
        return (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1))[:, 0]

    def add_to(self, y: torch.Tensor, x: torch.Tensor, lora: LoraBatch,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """y # [T, out] + every part's delta for x # [T, in]. `y` is the projection's own fresh
        output (`bias` included), so it is rescaled (DoRA) and the deltas added in place."""
        d = lora.decode_tokens
        s = None
        if lora.dora_rows is not None:
            s = self.s.index_select(0, lora.dora_rows)  # [D, out]; 1 on every row without DoRA
            dora_rescale(y[:d], s, bias)
        if lora.mix is not None:
            delta = self.dense_delta(x[:d], lora.mix, lora.window)  # [D, out]
            y[:d] += delta if s is None else delta * s
        elif lora.rows:
            assert self.a_rows is not None
            if lora.active is None:  # every block row: rows on the null slot hold zeros
                delta = lora_rows(x[:d], self.a_rows[:d], [b[:d] for b in self.b_rows])  # [D, out]
                if lora.scales is not None:
                    delta = delta * lora.scales[:d, None]
                y[:d] += delta if s is None else delta * s
            else:  # a few rows: their weights gathered (a copy of theirs only)
                idx = lora.active
                a_sel = self.a_rows.index_select(0, idx)
                b_sel = [b.index_select(0, idx) for b in self.b_rows]
                delta = lora_rows(x.index_select(0, idx), a_sel, b_sel)  # [n, out]
                if lora.scales is not None:
                    delta = delta * lora.scales.index_select(0, idx)[:, None]
                y.index_add_(0, idx, delta if s is None else delta * s.index_select(0, idx))
        if lora.mixed_rows is not None:  # rows that mix adapters (never DoRA: s = 1 there)
            assert lora.mixed is not None
            y.index_add_(0, lora.mixed_rows, self.dense_delta(x.index_select(0, lora.mixed_rows), lora.mixed, lora.window))
        for offset, length, slot, weight in lora.segments:
            delta = lora_single(x[offset : offset + length], self.a, self.bs, slot, lora.window)  # [n, out]
            if weight != 1.0:
                delta = delta * weight
            if slot in lora.dora_slots:
                dora_rescale(y[offset : offset + length], self.s[slot], bias)
                delta = delta * self.s[slot]
            y[offset : offset + length] += delta
        return y
