"""The slot bank: K fixed LoRA slots of rank R in every targeted projection of the base model.

This module owns every slot tensor and is their only writer (`load`, `clear`). Loading an adapter
copies each module's A and B into the slot's `[:r]` corner in place and zeroes what the previous
adapter left outside it (only what it wrote is touched, not the whole slot), so no tensor is
ever reallocated: a compiled model keeps its graphs and sees the new weights at once. Scaling
(alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B at load time, so the hot path has no
extra multiply. Slot index K (one past the last real slot) is the null slot, always zero: a row on
it computes exactly the base model.

Layout (see adapters/lora_layer.py): per fused module, a # [K+1, R, P, in] and one
b # [K+1, R, out_p] per fused projection, slot-major so that one slot's rank window is a view.
For the eager decode step each decode row also holds a copy of its slot's current window
(row-resident weights, refreshed by `route` only when a row's slot or that slot changes): they
cost max_rows x window ranks of memory, as many bytes as max_rows slots of that window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from adapters.host import LoraHost, TargetModule
from adapters.dora import weight_update_norms
from adapters.lora_layer import PADDING, LoraBatch, LoraSlots, Segment, Terms
from adapters.validation import AdapterWeights, SlotSpec
from adapters.shapes import power_of_two_bucket

MIN_RANK_WINDOW = 8


def nonzero(terms: Terms) -> Terms:
    """A row's terms without those of weight 0: they add nothing, and an overflowing product
    times 0 would be NaN."""
    return tuple(term for term in terms if term[1] != 0.0)


class SlotBank(nn.Module):
    def __init__(
        self, model: LoraHost, *, num_slots: int, max_rank: int, fixed_window: bool = False,
    ) -> None:
        super().__init__()
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be positive")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.null_slot = num_slots
        # Under torch.compile the window must not change with what is loaded (no recompiles).
        self.fixed_window = fixed_window
        # Rank written for each module in each slot; beyond it a slot's tensors are all zero.
        self._module_ranks: list[dict[str, int]] = [{} for _ in range(num_slots)]
        self._window = self._compute_window()  # read every step; recomputed only on writes
        self._slot_writes = [0] * num_slots  # per slot: row copies made before a write are stale
        self._max_rows = model.max_rows
        self._row_window = 0  # window the row-resident weights were allocated for (0: not yet)
        self._row_tags: list[tuple[int, int] | None] = []  # per row: (slot, its writes) held; None = zeros
        self._slot_modules: list[LoraSlots] = []
        self.dtype = model.compute_dtype
        by_module: dict[TargetModule, list[tuple[str, int, int]]] = defaultdict(list)
        for name, part in model.linear_parts().items():
            by_module[part.module].append((name, part.start, part.end))
        self._where: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._dora_where: dict[str, torch.Tensor] = {}  # HF module -> its part of the module's s # [K+1, out_p]
        self._parts: dict[str, tuple[TargetModule, int, int]] = {}  # HF module -> (module, start, end)
        self._dora_modules: list[set[str]] = [set() for _ in range(num_slots)]  # modules with DoRA, per slot
        self._dora_slots: frozenset[int] = frozenset()  # slots holding a DoRA adapter (read every step)
        self._views: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: dict[str, tuple[int, int]] = {}
        for index, (module, parts) in enumerate(by_module.items()):
            parts.sort(key=lambda p: p[1])
            d_in = module.in_features
            device = module.device  # a module's slots live with its weights (device maps)
            a = torch.zeros(num_slots + 1, max_rank, len(parts), d_in, dtype=self.dtype, device=device)
            self.register_buffer(f"a{index}", a, persistent=False)
            bs = []
            width = sum(end - start for _, start, end in parts)
            dora = torch.ones(num_slots + 1, width, dtype=self.dtype, device=device)  # s = 1: no DoRA
            self.register_buffer(f"s{index}", dora, persistent=False)
            offset = 0
            for p, (name, start, end) in enumerate(parts):
                b = torch.zeros(num_slots + 1, max_rank, end - start, dtype=self.dtype, device=device)
                self.register_buffer(f"b{index}_{p}", b, persistent=False)
                bs.append(b)
                self._where[name] = (a, p, b)
                self._dora_where[name] = dora[:, offset : offset + end - start]
                self._parts[name] = (module, start, end)
                self._targets[name] = (d_in, end - start)
                offset += end - start
            module.lora = LoraSlots(a, bs, dora)  # type: ignore[assignment]
            self._slot_modules.append(module.lora)
        self._others = frozenset(model.hf_module_names() - set(self._targets))
        # modules_to_save is the native model's (a module bank may be attached after the slots).
        # Bound methods and a lambda: the model must not become a submodule of the bank.
        self._full_modules = getattr(model, "full_modules", None)
        self._tied = bool(getattr(getattr(model, "cfg", None), "tie_word_embeddings", False))
        self._module_bank = lambda: getattr(model, "module_bank", None)

    def spec(self) -> SlotSpec:
        full, modules = self._full_modules, self._module_bank()
        return SlotSpec(targets=dict(self._targets), other_modules=self._others, max_rank=self.max_rank, dtype=self.dtype,
                        base_norms=self.base_norms, full_modules={} if full is None else full(),
                        max_vocab=0 if modules is None else modules.max_vocab, tied_embedding=self._tied,
                        no_module_slots="the transformers-backed path serves no full module copies" if full is None
                        else "this server has no module slots (--max-module-slots 0)")

    def base_norms(self, name: str, a: torch.Tensor, slot_b: torch.Tensor) -> torch.Tensor:
        """DoRA's ||W + B A|| per output channel of projection `name` # [out_p] float64, from the
        base weight as the model computes with it (dequantized, or through its packed form).
        a # [r, in]; slot_b # [r, out_p], the scaling folded in."""
        module, start, end = self._parts[name]
        products = module.weight_product(a.to(module.device, self.dtype))[:, start:end].cpu()  # [r, out_p] = A W^T
        return weight_update_norms(module.weight_norms_sq()[start:end].cpu(), products, a, slot_b)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")

    @property
    def ranks(self) -> list[int]:
        """Largest rank loaded in each slot; 0 = empty."""
        return [max(modules.values(), default=0) for modules in self._module_ranks]

    def _zero(self, name: str, slot: int, start: int, stop: int) -> None:
        a, part, b = self._where[name]
        a[slot, start:stop, part].zero_()
        b[slot, start:stop].zero_()

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for name, rank in self._module_ranks[slot].items():
            self._zero(name, slot, 0, rank)
        for name in self._dora_modules[slot]:
            self._dora_where[name][slot].fill_(1.0)
        self._module_ranks[slot] = {}
        self._set_dora(slot, set())
        self._window = self._compute_window()
        self._slot_writes[slot] += 1

    @torch.no_grad()
    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Hotswap: write every module's A and s*B into the slot's [:r] corner, in place, and zero
        whatever the previous adapter left beyond it (the rest of the slot is zero already)."""
        self._check_slot(slot)
        unknown = set(weights.modules) - set(self._where)
        if unknown or weights.rank > self.max_rank:
            raise ValueError("adapter was not validated against this slot bank")
        previous = self._module_ranks[slot]
        for name, old in previous.items():
            if name not in weights.modules:
                self._zero(name, slot, 0, old)
        dora = {name for name, lora in weights.modules.items() if lora.dora is not None}
        for name in self._dora_modules[slot] - dora:
            self._dora_where[name][slot].fill_(1.0)
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, lora in weights.modules.items():
            r = lora.rank
            targets += self._corner(name, slot, r)
            sources += [lora.a, lora.slot_b]  # [r, in], [r, out]
            if lora.dora is not None:
                targets.append(self._dora_where[name][slot])
                sources.append(lora.dora)  # [out]
            old = previous.get(name, 0)
            if old > r:  # the previous adapter wrote deeper here
                self._zero(name, slot, r, old)
        # What the slot may hold should the copy stop halfway: `clear` then zeroes all of it.
        self._module_ranks[slot] = {**previous, **{n: max(l.rank, previous.get(n, 0)) for n, l in weights.modules.items()}}
        self._dora_modules[slot] |= dora
        # One call for every copy: per-op dispatch, not bytes, dominates a hotswap on a CPU.
        torch._foreach_copy_(targets, sources)
        self._module_ranks[slot] = {name: lora.rank for name, lora in weights.modules.items()}
        self._set_dora(slot, dora)
        self._window = self._compute_window()
        self._slot_writes[slot] += 1

    def _corner(self, name: str, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of a slot's first `rank` ranks of module `name` (A part [r, in], B [r, out]),
        cached: making a view costs about as much as copying a small adapter's tensor."""
        key = (name, slot, rank)
        views = self._views.get(key)
        if views is None:
            a, part, b = self._where[name]
            views = self._views[key] = (a[slot, :rank, part], b[slot, :rank])
        return views

    def window(self) -> int:
        """Ranks to compute: covers the largest loaded rank (a power of two >= 8, <= R)."""
        return self._window

    def _compute_window(self) -> int:
        if self.fixed_window:
            return self.max_rank
        return power_of_two_bucket(max(self.ranks), floor=MIN_RANK_WINDOW, cap=self.max_rank)

    def dora_slots(self) -> frozenset[int]:
        """Slots that hold a DoRA adapter."""
        return self._dora_slots

    def _set_dora(self, slot: int, modules: set[str]) -> None:
        self._dora_modules[slot] = modules
        self._dora_slots = self._dora_slots | {slot} if modules else self._dora_slots - {slot}

    def route(
        self, decode_rows: Sequence[Terms | None], chunks: Sequence[tuple[int, int, Terms]] = (), *,
        device: torch.device,
    ) -> LoraBatch | None:
        """Routing for one forward: what each decode-block row adds (its (slot, weight) terms; ()
        = the base model; None = a row that is not decoding, whose output is dropped) and each
        prompt chunk's (first flat token, tokens, terms); host values, no device read-back. None
        when no token uses an adapter. The decode block is dense over all slots under
        torch.compile (fixed shapes), else each one-adapter row runs on its row-resident copy of
        its slot and each row that mixes adapters as one-token segments."""
        chunks = [(first, length, nonzero(terms)) for first, length, terms in chunks]
        decode_rows = [None if terms is None else nonzero(terms) for terms in decode_rows]
        segments = [(first, length, slot, weight) for first, length, terms in chunks for slot, weight in terms]
        rows = tuple(decode_rows)
        if not segments and not any(rows):
            return None
        dora = self.dora_slots()
        for terms in [*(t for t in rows if t), *(t for _, _, t in chunks)]:
            if len(terms) > 1 or any(weight != 1.0 for _, weight in terms):
                if any(slot in dora for slot, _ in terms):
                    raise ValueError("a DoRA adapter can be neither scaled nor mixed with others")
        return self._route(rows, tuple(segments), device, dora)

    def _route(self, padded: tuple[Terms | None, ...], segments: tuple[Segment, ...], device: torch.device,
               dora: frozenset[int]) -> LoraBatch:
        rows = tuple(terms or () for terms in padded)
        common = {"window": self.window(), "null_slot": self.null_slot, "decode_tokens": len(rows),
                  "row_terms": rows, "dora_slots": dora}
        if not rows:
            return LoraBatch(**common, segments=segments)  # type: ignore[arg-type]
        # The DoRA slot of each row; always an input under compile (one graph whatever is loaded).
        dora_of = [terms[0][0] if len(terms) == 1 and terms[0][0] in dora else self.null_slot for terms in rows]
        dora_rows = None
        if self.fixed_window or any(slot != self.null_slot for slot in dora_of):
            dora_rows = torch.tensor(dora_of, dtype=torch.int64, device=device)
        if self.fixed_window:
            mix = self._weights(rows, device)  # [D, K+1]
            return LoraBatch(**common, segments=segments, mix=mix, dora_rows=dora_rows)  # type: ignore[arg-type]
        if len(rows) > self._max_rows:
            raise ValueError(f"a decode block of {len(rows)} rows; the model has {self._max_rows}")
        # Rows that mix adapters run dense over every slot, weighted; the others on their
        # row-resident copy of their slot.
        mixing = [row for row, terms in enumerate(rows) if len(terms) > 1]
        if mixing:
            common["mixed_rows"] = torch.tensor(mixing, dtype=torch.int64, device=device)
            common["mixed"] = self._weights([rows[row] for row in mixing], device)
        single = tuple(PADDING if terms is None else terms[0][0] if len(terms) == 1 else self.null_slot
                       for terms in padded)
        active = self._refresh_rows(single)
        if not active:  # only prompt chunks and mixed rows use adapters
            return LoraBatch(**common, segments=segments, dora_rows=dora_rows)  # type: ignore[arg-type]
        weights = [terms[0][1] if len(terms) == 1 else 1.0 for terms in rows]
        scales = None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=self.dtype, device=device)
        # A few adapter rows among many: gather just theirs; else every block row (null rows are zero).
        index = torch.tensor(active, dtype=torch.int64, device=device) if 3 * len(active) <= len(rows) else None
        return LoraBatch(**common, segments=segments, rows=True, active=index, scales=scales,  # type: ignore[arg-type]
                         dora_rows=dora_rows)

    def _weights(self, rows: Sequence[Terms], device: torch.device) -> torch.Tensor:
        """Each row's weight per slot # [n, K+1] in the slots' dtype."""
        weights = torch.zeros(len(rows), self.num_slots + 1, dtype=self.dtype)
        for row, terms in enumerate(rows):
            for slot, weight in terms:
                weights[row, slot] = weight
        return weights.to(device)

    def _refresh_rows(self, rows: tuple[int, ...]) -> list[int]:
        """Make every decoding row's row-resident weights hold its slot (zeros for the null slot),
        copying only rows whose slot or slot contents changed; returns the rows on real slots."""
        window = self.window()
        if window != self._row_window:
            for module in self._slot_modules:
                module.allocate_rows(self._max_rows, window)
            self._row_window, self._row_tags = window, [None] * self._max_rows
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        active: list[int] = []
        for row, slot in enumerate(rows):
            if slot == PADDING:
                continue
            if slot == self.null_slot:
                if self._row_tags[row] is not None:
                    zeros += [t for module in self._slot_modules for t in module.row_targets(row)]
                    self._row_tags[row] = None
                continue
            active.append(row)
            tag = (slot, self._slot_writes[slot])
            if self._row_tags[row] != tag:
                for module in self._slot_modules:
                    t, s = module.row_views(row, slot, window)
                    targets += t
                    sources += s
                self._row_tags[row] = tag
        with torch.no_grad():
            if targets:  # one call for every copy, as a hotswap
                torch._foreach_copy_(targets, sources)
            if zeros:
                torch._foreach_zero_(zeros)
        return active

    def batch(self, slots: torch.Tensor, scales: Sequence[float] = ()) -> LoraBatch:
        """Routing for a decode block whose rows use `slots` # [B], scaled by `scales` (tests
        and tools; reads the slots back to the host)."""
        weights = list(scales) or [1.0] * slots.shape[0]
        rows = [() if slot == self.null_slot else ((slot, w),) for slot, w in zip(slots.tolist(), weights)]
        return self.mix_batch(rows, device=slots.device)

    def mix_batch(self, rows: Sequence[Terms], *, device: torch.device | str = "cpu") -> LoraBatch:
        """Routing for a decode block whose row i adds `rows[i]` (tests and tools)."""
        return self._route(tuple(nonzero(terms) for terms in rows), (), torch.device(device), self.dora_slots())
