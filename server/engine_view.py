"""What other threads may know of the engine: immutable snapshots the engine thread publishes
after every step and every slot command.

The slot table, the rows and the counters belong to the engine thread. `/ready` and `/metrics`
read the last `EngineSnapshot` (replacing a reference is atomic): they never see a half-updated
table and never wait for a step, so they answer even when a step hangs. Admin reads ask the
engine itself, through its queue (`Engine.adapter_slots`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from adapters.slot_table import SlotTable
from server.engine_blocks import KVStats
from server.scheduling import WaitStats


@dataclass(frozen=True)
class SlotView:
    resident: Mapping[str, int]  # adapter version key -> slot
    references: tuple[int, ...]  # running rows per slot
    loads: int
    evictions: int
    hits: int
    waits: int
    waiting_adapters: tuple[str, ...]  # adapters of queued requests, sorted
    pinned: tuple[str, ...] = ()  # adapter version keys pinned in their slots, sorted

    @classmethod
    def of(cls, table: SlotTable, waiting: Iterable[str]) -> SlotView:
        counters = table.counters
        resident = table.resident()
        return cls(
            resident=MappingProxyType(resident),
            references=tuple(table.references()),
            loads=counters.loads, evictions=counters.evictions, hits=counters.hits, waits=counters.waits,
            waiting_adapters=tuple(sorted(set(waiting))),
            pinned=tuple(sorted(key for key in resident if table.is_pinned(key))),
        )

    def as_dict(self) -> dict[str, object]:
        """The `slots` block of /ready (and what /metrics reads)."""
        return {
            "resident": dict(self.resident), "references": list(self.references), "loads": self.loads,
            "evictions": self.evictions, "hits": self.hits, "waits": self.waits,
            "waiting_adapters": list(self.waiting_adapters), "pinned": list(self.pinned),
        }


@dataclass(frozen=True)
class EngineSnapshot:
    running: int = 0
    generated_tokens: int = 0
    finished: Mapping[str, int] = field(default_factory=dict)  # by finish reason
    compile: Mapping[str, object] = field(default_factory=dict)
    slots: SlotView | None = None
    wait: WaitStats | None = None  # how long adapter requests waited for a slot (a copy)
    kv: KVStats | None = None

    def as_dict(self) -> dict[str, object]:
        """The scheduler block of /ready (what /metrics reads)."""
        out: dict[str, object] = {
            "running": self.running, "finished": dict(self.finished), "generated_tokens": self.generated_tokens,
            "compile": dict(self.compile),
        }
        if self.kv is not None:
            out["kv_cache"] = self.kv.as_dict()
        if self.slots is not None and self.wait is not None:  # an engine with LoRA slots
            out["slots"] = self.slots.as_dict()
            wait = self.wait
            out["adapter_wait_s"] = {"admitted": wait.admitted, "max": wait.max_wait_s,
                                     "mean": wait.total_wait_s / wait.admitted if wait.admitted else 0.0}
        return out
