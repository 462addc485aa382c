"""Which adapter sits in which slot, who is using it, and which slot to give up next.

Plain Python, no tensors: the engine asks `acquire(name)` for a row and `release(slot)` when the
row ends; the table answers with a slot, possibly after choosing a victim (the least recently
used slot that no running row references) whose contents the caller must overwrite. A slot
referenced by a running row is never chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class SlotState:
    name: str | None = None  # adapter in the slot; None = empty
    refs: int = 0  # running rows using it
    last_used: int = 0  # logical clock of the last acquire
    pinned: bool = False  # never chosen as a victim
    retiring: bool = False  # unloaded while in use: emptied when its last row ends


@dataclass
class SlotCounters:
    hits: int = 0  # acquire found the adapter already in a slot
    loads: int = 0  # adapter written into a slot
    evictions: int = 0  # a loaded adapter was replaced by another
    waits: int = 0  # acquire had to refuse: every slot busy with other adapters


@dataclass
class SlotGrant:
    slot: int
    load: bool  # the caller must write the adapter into the slot before use
    evicted: str | None = None


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.slots = [SlotState() for _ in range(num_slots)]
        self.counters = SlotCounters()
        self._clock = 0
        self._where: dict[str, int] = {}
        # Unloaded adapters (old versions): a queued request may still need one; it is loaded for
        # that request's rows only and emptied when they end, never left resident.
        self._retired: set[str] = set()

    def slot_of(self, name: str) -> int | None:
        return self._where.get(name)

    @staticmethod
    def _evictable(state: SlotState) -> bool:
        return state.refs == 0 and not state.pinned

    def acquire(self, name: str) -> SlotGrant | None:
        """Reserve a slot holding `name` for one row; None if every slot is busy with others."""
        self._clock += 1
        slot = self._where.get(name)
        # A retiring slot takes more rows only for a retired (replaced or deleted) version: its
        # queued requests run side by side while the old version stays in its slot, and no new
        # request can ask for it. An operator's unload of the current version instead drains
        # first; later requests reload it.
        if slot is not None and (not self.slots[slot].retiring or name in self._retired):
            state = self.slots[slot]
            state.refs += 1
            state.last_used = self._clock
            self.counters.hits += 1
            return SlotGrant(slot=slot, load=False)
        free = [i for i, s in enumerate(self.slots) if self._evictable(s)]
        if not free or slot is not None:  # a retiring copy must drain before it is reloaded
            self.counters.waits += 1
            return None
        # Prefer an empty slot, then the least recently used idle one.
        slot = min(free, key=lambda i: (self.slots[i].name is not None, self.slots[i].last_used))
        state = self.slots[slot]
        evicted = state.name
        if evicted is not None:
            del self._where[evicted]
            self.counters.evictions += 1
        state.name, state.refs, state.last_used = name, 1, self._clock
        state.retiring = name in self._retired
        self._where[name] = slot
        self.counters.loads += 1
        return SlotGrant(slot=slot, load=True, evicted=evicted)

    def can_acquire(self, names: Iterable[str]) -> bool:
        """Whether `acquire` would give every one of `names` (distinct) a slot now; changes
        nothing, so a request that needs several slots at once never evicts for nothing."""
        wanted = set(names)
        missing = 0
        for name in wanted:
            slot = self._where.get(name)
            if slot is None:
                missing += 1
            elif self.slots[slot].retiring and name not in self._retired:
                return False  # a retiring copy drains before it is reloaded
        return missing <= sum(self._evictable(s) and s.name not in wanted for s in self.slots)

    def release(self, slot: int) -> bool:
        """One row stopped using the slot. True when the caller must now clear it (it was
        unloaded while in use and this was its last row)."""
        state = self.slots[slot]
        if state.refs <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        state.refs -= 1
        if state.refs == 0 and state.retiring:
            self.forget(slot)
            return True
        return False

    def forget(self, slot: int) -> None:
        """The slot's load failed or its adapter is gone: mark it empty."""
        state = self.slots[slot]
        if state.name is not None:
            self._where.pop(state.name, None)
        state.name, state.pinned, state.retiring = None, False, False

    def unpinned_capacity(self, names: Iterable[str]) -> int:
        """Slots that could hold `names` at once: the unpinned ones, plus pinned ones holding one of them."""
        wanted = set(names)
        return sum(not s.pinned or s.name in wanted for s in self.slots)

    def could_hold(self, names: Iterable[str]) -> bool:
        """Whether `names` (distinct) could ever be resident together, pins staying as they are."""
        wanted = list(names)
        return len(wanted) <= self.unpinned_capacity(wanted)

    def pin(self, name: str, pinned: bool) -> None:
        """Keep (or stop keeping) a resident adapter in its slot. At least one slot always stays
        unpinned, so every other adapter can still be served."""
        slot = self._where.get(name)
        if slot is None:
            raise KeyError(name)
        if pinned and not self.slots[slot].pinned and sum(s.pinned for s in self.slots) + 1 >= len(self.slots):
            raise ValueError(f"pinning {name!r} would leave no slot for other adapters")
        self.slots[slot].pinned = pinned

    def unload(self, name: str, *, retire: bool = True) -> int | None:
        """Take `name` out of its slot: the slot to clear now, or None (not resident, or rows
        still use it: it is emptied when the last one ends and new rows no longer get it).
        `retire`: the name is an old version (replaced or deleted), never to stay resident again;
        False for an operator's unload of the current version, which later requests reload."""
        if retire:
            self._retired.add(name)
        slot = self._where.get(name)
        if slot is None:
            return None
        state = self.slots[slot]
        if state.refs > 0:
            state.retiring, state.pinned = True, False
            return None
        self.forget(slot)
        return slot

    def revive(self, name: str) -> None:
        """`name` is current again (its content was published anew): keep it resident as usual."""
        self._retired.discard(name)

    def prune_retired(self, needed: Iterable[str]) -> None:
        """Forget the unloaded versions that no queued request needs: the set only marks future
        loads, and every replace or delete adds a name to it. `needed` is read only when there is
        something to forget (the engine calls this every step)."""
        if self._retired:
            self._retired &= set(needed)

    def retired(self) -> frozenset[str]:
        return frozenset(self._retired)

    def is_pinned(self, name: str) -> bool:
        slot = self._where.get(name)
        return slot is not None and self.slots[slot].pinned

    def references(self) -> list[int]:
        return [s.refs for s in self.slots]

    def resident(self) -> dict[str, int]:
        return dict(self._where)
