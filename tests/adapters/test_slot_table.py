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


def test_pinned_slots_are_never_victims_and_one_slot_stays_unpinned() -> None:
    table = SlotTable(3)
    for name in "ab":
        table.release(table.acquire(name).slot)  # type: ignore[union-attr]
    table.pin("a", True)
    table.pin("b", True)
    try:
        table.acquire("c") and table.pin("c", True)
    except ValueError as exc:
        assert "no slot for other adapters" in str(exc)
    else:
        raise AssertionError("pinning every slot must be refused")
    table.release(table.slot_of("c"))  # type: ignore[arg-type]
    placed = table.acquire("d")  # only c's slot is a candidate
    assert placed is not None and placed.evicted == "c"
    assert table.is_pinned("a") and table.is_pinned("b") and not table.is_pinned("d")
    table.pin("a", False)
    table.release(placed.slot)
    assert table.acquire("e").evicted == "a"  # type: ignore[union-attr]


def test_operator_unload_waits_for_running_rows_and_new_rows_do_not_join() -> None:
    """Unloading the current version (retire=False): it drains, then later requests reload it."""
    table = SlotTable(2)
    old = table.acquire("v1")
    assert old is not None
    assert table.unload("v1", retire=False) is None  # in use: retiring, not cleared yet
    assert table.acquire("v1") is None  # a draining current version takes no new rows
    assert table.release(old.slot) is True  # last row gone: the caller clears it now
    assert table.resident() == {} and table.references() == [0, 0]
    again = table.acquire("v1")  # loaded afresh afterwards
    assert again is not None and again.load
    assert table.release(again.slot) is False
    assert table.unload("v1") == again.slot and table.unload("v1") is None  # idle: cleared at once


def test_queued_rows_of_a_retired_version_run_side_by_side() -> None:
    """A replaced or deleted version (retire=True): the requests queued for it join its slot
    while it drains, all at once, instead of one after another; it empties after the last."""
    table = SlotTable(2)
    first = table.acquire("v1")
    assert first is not None
    assert table.unload("v1") is None  # replaced while in use
    joined = [table.acquire("v1") for _ in range(3)]  # requests accepted before the swap
    assert all(p is not None and p.slot == first.slot and not p.load for p in joined)
    assert table.references()[first.slot] == 4
    for placement in joined:
        assert table.release(placement.slot) is False  # type: ignore[union-attr]
    assert table.release(first.slot) is True and table.resident() == {}  # emptied after the last
    # Not resident afterwards: a late request for it loads it for its own rows only.
    late = table.acquire("v1")
    assert late is not None and late.load and table.release(late.slot) is True


def test_an_unloaded_version_comes_back_only_for_its_queued_rows() -> None:
    table = SlotTable(2)
    table.release(table.acquire("v1").slot)  # type: ignore[union-attr]
    assert table.unload("v1") is not None  # idle: cleared at once
    late = table.acquire("v1")  # a request accepted before the swap, admitted after it
    assert late is not None and late.load
    assert table.release(late.slot) is True and table.resident() == {}  # not left resident
    table.revive("v1")  # published again: resident as usual
    again = table.acquire("v1")
    assert again is not None and table.release(again.slot) is False and table.resident() == {"v1": again.slot}


def test_unloaded_versions_are_forgotten_once_no_queued_request_needs_them() -> None:
    table = SlotTable(2)
    for version in ("v1", "v2", "v3"):
        table.release(table.acquire(version).slot)  # type: ignore[union-attr]
        table.unload(version)
    table.prune_retired({"v2"})  # a queued request still asks for v2
    assert table.retired() == {"v2"}
    late = table.acquire("v2")
    assert late is not None and table.release(late.slot) is True  # still emptied after its rows
    table.prune_retired(set())
    assert table.retired() == frozenset()
