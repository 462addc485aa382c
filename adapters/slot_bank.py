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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from adapters.lora_layer import LoraBatch, LoraSlots, Segment, plan_chunks
from adapters.validation import AdapterWeights, SlotSpec
from server.linear import Linear
from server.model import Transformer
from server.shapes import power_of_two_bucket

MIN_RANK_WINDOW = 8


class SlotBank(nn.Module):
    def __init__(self, model: Transformer, *, num_slots: int, max_rank: int, fixed_window: bool = False) -> None:
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
        self.version = 0  # bumped by every write: copies of slot weights made before it are stale
        self.dtype = model.model.embed_tokens.weight.dtype
        by_module: dict[Linear, list[tuple[str, int, int]]] = defaultdict(list)
        for name, part in model.linear_parts().items():
            by_module[part.module].append((name, part.start, part.end))
        self._where: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._views: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: dict[str, tuple[int, int]] = {}
        for index, (module, parts) in enumerate(by_module.items()):
            parts.sort(key=lambda p: p[1])
            d_in = module.in_features
            device = module.device  # a module's slots live with its weights (device maps)
            a = torch.zeros(num_slots + 1, max_rank, len(parts), d_in, dtype=self.dtype, device=device)
            self.register_buffer(f"a{index}", a, persistent=False)
            bs = []
            for p, (name, start, end) in enumerate(parts):
                b = torch.zeros(num_slots + 1, max_rank, end - start, dtype=self.dtype, device=device)
                self.register_buffer(f"b{index}_{p}", b, persistent=False)
                bs.append(b)
                self._where[name] = (a, p, b)
                self._targets[name] = (d_in, end - start)
            module.lora = LoraSlots(a, bs)  # type: ignore[assignment]
        self._others = frozenset(model.hf_module_names() - set(self._targets))

    def spec(self) -> SlotSpec:
        return SlotSpec(targets=dict(self._targets), other_modules=self._others, max_rank=self.max_rank, dtype=self.dtype)

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
        self._module_ranks[slot] = {}
        self._window = self._compute_window()
        self.version += 1

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
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for name, lora in weights.modules.items():
            r = lora.rank
            targets += self._corner(name, slot, r)
            sources += [lora.a, lora.slot_b]  # [r, in], [r, out]
            old = previous.get(name, 0)
            if old > r:  # the previous adapter wrote deeper here
                self._zero(name, slot, r, old)
        # One call for every copy: per-op dispatch, not bytes, dominates a hotswap on a CPU.
        torch._foreach_copy_(targets, sources)
        self._module_ranks[slot] = {name: lora.rank for name, lora in weights.modules.items()}
        self._window = self._compute_window()
        self.version += 1

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

    def route(
        self, decode_slots: Sequence[int], segments: Sequence[Segment] = (), *, device: torch.device
    ) -> LoraBatch | None:
        """Routing for one forward: the slot of each decode-block row (null_slot = no adapter) and
        the prompt chunks on real slots (host values: no device read-back). None when no token
        uses an adapter. The decode block is dense over all slots under torch.compile (fixed
        shapes), else chunked by slot."""
        null = self.null_slot
        segments = tuple(s for s in segments if s[2] != null)
        if not segments and all(slot == null for slot in decode_slots):
            return None
        return self._route(tuple(decode_slots), segments, device)

    def _route(self, rows: tuple[int, ...], segments: tuple[Segment, ...], device: torch.device) -> LoraBatch:
        common = {"window": self.window(), "null_slot": self.null_slot, "version": self.version,
                  "decode_tokens": len(rows), "row_slots": rows, "segments": segments}
        if not rows:
            return LoraBatch(**common)  # type: ignore[arg-type]
        if self.fixed_window:
            ids = torch.tensor(rows, dtype=torch.int64, device=device)
            onehot = torch.nn.functional.one_hot(ids, self.num_slots + 1).to(self.dtype)  # [D, K+1]
            return LoraBatch(**common, onehot=onehot)  # type: ignore[arg-type]
        return LoraBatch(**common, chunks=plan_chunks(list(rows), self.null_slot, device))  # type: ignore[arg-type]

    def batch(self, slots: torch.Tensor) -> LoraBatch:
        """Routing for a decode block whose rows use `slots` # [B] (tests and tools; reads the
        slots back to the host)."""
        return self._route(tuple(slots.tolist()), (), slots.device)
