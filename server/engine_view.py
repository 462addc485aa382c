"""What other threads may know of the engine's slots: an immutable view the engine thread
publishes after every step and every slot command.

The slot table and the queue belong to the engine thread; admin reads, `/ready` and `/metrics`
read this view instead (replacing a reference is atomic), so they never see a half-updated
table and never wait for a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from adapters.slot_table import SlotTable


@dataclass(frozen=True)
class SlotView:
    resident: Mapping[str, int]  # adapter version key -> slot
    pinned: frozenset[str]
    references: tuple[int, ...]  # running rows per slot
    loads: int
    evictions: int
    hits: int
    waits: int
    waiting_adapters: tuple[str, ...]  # adapters of queued requests, sorted

    @classmethod
    def of(cls, table: SlotTable, waiting: Iterable[str]) -> SlotView:
        counters = table.counters
        resident = table.resident()
        return cls(
            resident=MappingProxyType(resident),
            pinned=frozenset(s.name for s in table.slots if s.pinned and s.name is not None),
            references=tuple(table.references()),
            loads=counters.loads, evictions=counters.evictions, hits=counters.hits, waits=counters.waits,
            waiting_adapters=tuple(sorted(set(waiting))),
        )

    def as_dict(self) -> dict[str, object]:
        """The `slots` block of /ready (and what /metrics reads)."""
        return {
            "resident": dict(self.resident), "references": list(self.references), "loads": self.loads,
            "evictions": self.evictions, "hits": self.hits, "waits": self.waits,
            "waiting_adapters": list(self.waiting_adapters),
        }
