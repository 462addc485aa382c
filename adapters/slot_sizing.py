"""How many LoRA slots fit a memory budget, from the shapes the slot bank allocates.

`adapters/slot_bank.py` allocates, for every fused projection module with P Hugging Face parts
(q/k/v fused in qkv_proj: P = 3) taking `in` features:

    a    # [K+1, R, P, in]     one A per part, side by side
    b_p  # [K+1, R, out_p]     one B per part
    s    # [K+1, out]          DoRA's per-channel factor (1 for plain LoRA)

in the model dtype. One slot of rank R therefore costs R * (P * in + out) + out elements per
module (out = sum(out_p)), and K real slots cost K+1 slots' bytes: slot K is the null slot (always zero, a row on it
computes the base model), which takes memory like any other.

Pure functions only: the model's shapes come in as `FusedShape`s, from a built model
(`fused_shapes(model.linear_parts())`) or, before any weight is read, from its config
(`server/device_map.py`), so the count is known before the model is placed on devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from adapters.errors import SlotBudgetError
from adapters.host import TargetModule, TargetPart

MAX_AUTO_SLOTS = 1024  # `auto` never sizes more: the slot table is scanned per admission
# Under --compile the step is dense over every slot ([B, K+1] one-hot routing), so its cost grows
# with K whatever is loaded; `auto` keeps K at the former fixed default there.
COMPILE_AUTO_SLOTS = 8

SizedBy = Literal["memory", "flag"]


class FusedShape(NamedTuple):
    """One fused projection module as the slot bank sees it (same order as
    `server.device_map.projection_shapes`)."""

    d_in: int  # input features, shared by the fused parts (one A per part)
    d_out: int  # output features of all parts together (sum of the B widths)
    parts: int  # Hugging Face projections fused in the module


def fused_shapes(parts: Mapping[str, TargetPart]) -> list[FusedShape]:
    """The fused modules behind `model.linear_parts()`, grouped as the slot bank groups them."""
    grouped: dict[TargetModule, list[TargetPart]] = {}
    for part in parts.values():
        grouped.setdefault(part.module, []).append(part)
    return [
        FusedShape(module.in_features, sum(p.end - p.start for p in members), len(members))
        for module, members in grouped.items()
    ]


def slot_bytes(shapes: Iterable[FusedShape], *, max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one slot of rank `max_rank` over `shapes`: A [R, P, in], the Bs [R, out_p] and s [out]."""
    return dtype_bytes * sum(max_rank * (s.parts * s.d_in + s.d_out) + s.d_out for s in shapes)


def bank_bytes(per_slot_bytes: int, num_slots: int) -> int:
    """Bytes of a slot bank of `num_slots` real slots: the null slot costs one more."""
    return per_slot_bytes * (num_slots + 1)


def slots_for_budget(budget_bytes: int, per_slot_bytes: int, *, cap: int = MAX_AUTO_SLOTS) -> int:
    """Real slots whose tensors, null slot included, fit in `budget_bytes`, at most `cap`;
    0 when not even one does (the caller decides how to fail)."""
    if per_slot_bytes <= 0 or cap < 1:
        raise ValueError("per_slot_bytes and cap must be positive")
    return max(0, min(budget_bytes // per_slot_bytes - 1, cap))


@dataclass(frozen=True)
class SlotPlan:
    """The slot bank a run allocates and why it has that many slots."""

    count: int  # real slots, K (the null slot comes on top)
    rank: int
    bytes_per_slot: int
    budget_bytes: int | None  # --lora-memory under `auto`; None when --max-loras gave the count
    sized_by: SizedBy
    note: str | None = None  # why `count` is below what the budget holds

    @property
    def bytes(self) -> int:
        return bank_bytes(self.bytes_per_slot, self.count)

    def info(self) -> dict[str, object]:
        """For GET /admin/model."""
        return {"count": self.count, "rank": self.rank, "bytes_per_slot": self.bytes_per_slot, "bytes": self.bytes,
                "budget_bytes": self.budget_bytes, "sized_by": self.sized_by}

    def describe(self) -> str:
        """One log line: how many slots, of which rank, how much memory and what decided it."""
        source = (f"--lora-memory {format_bytes(self.budget_bytes)}" if self.budget_bytes is not None
                  else f"--max-loras {self.count}")
        line = (f"LoRA slots: {self.count} of rank {self.rank}, {format_bytes(self.bytes_per_slot)} each, "
                f"{format_bytes(self.bytes)} with the null slot (sized by {source})")
        return f"{line}; {self.note}" if self.note else line


def plan_slots(
    requested: int | Literal["auto"], *, budget_bytes: int, per_slot_bytes: int, rank: int, compiled: bool
) -> SlotPlan:
    """Resolve --max-loras: an int is kept as given; `auto` takes what `budget_bytes` holds,
    at most MAX_AUTO_SLOTS, and at most COMPILE_AUTO_SLOTS under --compile."""
    if requested != "auto":
        return SlotPlan(requested, rank, per_slot_bytes, None, "flag")
    held = budget_bytes // per_slot_bytes - 1
    if held < 1:
        raise SlotBudgetError(
            f"--lora-memory {format_bytes(budget_bytes)} holds no LoRA slot: one slot of rank {rank} takes "
            f"{format_bytes(per_slot_bytes)} and the null slot as much again, so at least "
            f"{format_bytes(bank_bytes(per_slot_bytes, 1))} ({bank_bytes(per_slot_bytes, 1)} bytes) is needed; "
            f"raise --lora-memory, lower --max-lora-rank, or give --max-loras a number"
        )
    count = slots_for_budget(budget_bytes, per_slot_bytes)
    note = None
    if compiled and count > COMPILE_AUTO_SLOTS:
        count = COMPILE_AUTO_SLOTS
        note = (f"--compile: {count} slots although the budget holds {held}, because the compiled step "
                f"computes every slot for every row (give --max-loras N to choose more)")
    elif held > count:
        note = f"capped at {count} slots although the budget holds {held}"
    return SlotPlan(count, rank, per_slot_bytes, budget_bytes, "memory", note)


def format_bytes(n: int) -> str:
    """`n` bytes in binary units for log lines and error messages, e.g. `1.00 GiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
