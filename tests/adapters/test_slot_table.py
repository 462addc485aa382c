from __future__ import annotations

from adapters.slot_table import SlotTable


def test_hits_loads_and_lru_eviction_of_idle_slots() -> None:
    table = SlotTable(2)
    a = table.acquire("a")
    b = table.acquire("b")
    assert a is not None and a.load and b is not None and b.load and a.slot != b.slot
    assert table.acquire("c") is None  # both referenced: wait, never evict a used slot
    assert table.counters.waits == 1
    table.release(a.slot)
    hit = table.acquire("b")
    assert hit is not None and not hit.load and hit.slot == b.slot
    c = table.acquire("c")
    assert c is not None and c.slot == a.slot and c.evicted == "a"
    assert table.resident() == {"b": b.slot, "c": a.slot}
    assert (table.counters.loads, table.counters.evictions, table.counters.hits) == (3, 1, 1)


def test_least_recently_used_idle_slot_is_the_victim() -> None:
    table = SlotTable(3)
    slots = {name: table.acquire(name).slot for name in "xyz"}  # type: ignore[union-attr]
    for slot in slots.values():
        table.release(slot)
    table.release(table.acquire("x").slot)  # type: ignore[union-attr]  # x used most recently
    table.release(table.acquire("z").slot)  # type: ignore[union-attr]
    placed = table.acquire("w")
    assert placed is not None and placed.evicted == "y"


def test_empty_slot_is_preferred_and_forget() -> None:
    table = SlotTable(2)
    first = table.acquire("a")
    assert first is not None
    table.release(first.slot)
    second = table.acquire("b")
    assert second is not None and second.evicted is None  # the empty slot, not a's
    table.release(second.slot)
    table.forget(second.slot)
    assert table.slot_of("b") is None and table.references() == [0, 0]
