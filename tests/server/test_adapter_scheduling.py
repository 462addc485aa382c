"""Adapter-aware admission: more adapters than slots, mixed batches, fairness, backpressure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.peft_format import LoraConfig
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights, ModuleLora
from server.engine import Engine
from server.errors import QueueFullError
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.fakes import Collector


def random_adapters(bank: SlotBank, count: int, ranks: list[int] | None = None) -> dict[str, AdapterWeights]:
    """`count` random adapters, each on its own subset of the targets; ranks 2..8 unless given."""
    spec = bank.spec()
    adapters = {}
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        rank = ranks[i % len(ranks)] if ranks else 2 + i % 7
        modules = {
            name: ModuleLora(a=torch.randn(rank, d_in, generator=g) * 0.3, b=torch.randn(d_out, rank, generator=g) * 0.3, scaling=1.0)
            for j, (name, (d_in, d_out)) in enumerate(spec.targets.items())
            if (j + i) % 3  # each adapter targets a different subset (the same one every run)
        }
        adapters[f"ad{i}"] = AdapterWeights(f"ad{i}", LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear"), modules)
    return adapters


def make_engine(folder: Path, *, rows: int, slots: int, adapters: int, **kwargs: object) -> tuple[Engine, dict[str, AdapterWeights]]:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=rows, max_len=64)
    bank = SlotBank(model, num_slots=slots, max_rank=8)
    store = random_adapters(bank, adapters)
    engine = Engine(
        ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(slots),
        adapter_weights=store.__getitem__, **kwargs,  # type: ignore[arg-type]
    )
    return engine, store


def request(rid: str, adapter: str | None, prompt: list[int], n: int = 6) -> GenerationRequest:
    return GenerationRequest(rid, prompt, max_tokens=n, sampling=SamplingParams(temperature=0), adapter=adapter)


def test_48_requests_over_12_adapters_on_4_slots(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, rows=8, slots=4, adapters=12)
    got = Collector()
    requests = [request(f"r{i}", f"ad{i % 12}" if i % 13 else None, [3 + i % 5, 9, 4 + i % 11]) for i in range(48)]
    for r in requests:
        engine.submit(r, got)
    engine.run_until_idle()
    assert len(got.final) == 48 and all(e.finish_reason == "length" for e in got.final.values())
    assert engine.slot_table is not None and engine.slot_table.references() == [0, 0, 0, 0]
    counters = engine.slot_table.counters
    assert counters.loads >= 12 and counters.evictions >= 8
    assert engine.wait_stats.admitted == sum(r.adapter is not None for r in requests)
    # Every output equals the same request run alone on a fresh engine.
    for r in requests[:: 5]:
        solo_engine, _ = make_engine(tiny_dir, rows=8, slots=4, adapters=12)
        solo = Collector()
        solo_engine.submit(r, solo)
        solo_engine.run_until_idle()
        assert solo.tokens[r.request_id] == got.tokens[r.request_id], r.request_id
    # Adapters really change outputs: the same prompt on two adapters differs.
    a, b = Collector(), Collector()
    for adapter, sink in (("ad1", a), ("ad2", b)):
        engine.submit(request("x", adapter, [5, 6, 7], n=8), sink)
        engine.run_until_idle()
    assert a.tokens["x"] != b.tokens["x"]


def test_rare_adapter_is_not_starved(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, rows=4, slots=2, adapters=3, max_wait_s=0.0)
    got = Collector()
    for i in range(6):  # popular adapters keep both slots busy
        engine.submit(request(f"p{i}", f"ad{i % 2}", [5, 6], n=12), got)
    engine.submit(request("rare", "ad2", [7, 8], n=2), got)
    for i in range(6, 30):
        engine.submit(request(f"p{i}", f"ad{i % 2}", [5, 6], n=12), got)
    engine.run_until_idle()
    # With max_wait_s=0 the rare request holds back everything that arrived after it.
    assert got.order.index("rare") < got.order.index("p8")


def test_queue_bound(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, rows=2, slots=2, adapters=1, max_waiting=3)
    got = Collector()
    for i in range(3):
        engine.submit(request(f"q{i}", None, [5]), got)
    with pytest.raises(QueueFullError):
        engine.submit(request("q3", None, [5]), got)
    engine.run_until_idle()
    engine.submit(request("q4", None, [5]), got)  # room again once admitted
    engine.run_until_idle()
    assert len(got.final) == 4


def test_cancel_releases_the_slot_reference(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, rows=2, slots=2, adapters=2)
    got = Collector()
    engine.submit(request("a", "ad0", [5, 6], n=30), got)
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.slot_table is not None and sorted(engine.slot_table.references()) == [0, 1]
    engine.cancel("a")
    engine._drain_inbox(block=False)
    assert engine.slot_table.references() == [0, 0] and got.final["a"].finish_reason == "abort"


def test_stats_report_slots_and_waits(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, rows=2, slots=2, adapters=3)
    got = Collector()
    for i in range(6):
        engine.submit(request(f"s{i}", f"ad{i % 3}", [5, 6], n=3), got)
    engine.run_until_idle()
    stats = engine.stats()
    slots = stats["slots"]
    assert isinstance(slots, dict) and slots["references"] == [0, 0] and len(slots["resident"]) == 2
    assert slots["loads"] >= 3 and slots["loads"] + slots["hits"] == 6
    assert stats["adapter_wait_s"]["admitted"] == 6  # type: ignore[index]
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_requests_queued_for_a_replaced_version_run_together(tiny_dir: Path) -> None:
    """Requests accepted for a version that is then replaced (or deleted) are admitted side by
    side on the old version's slot while it drains: not one after another, and they do not hold
    back requests for other adapters (before: one per drain, then the starvation rule stopped
    everyone behind them)."""
    engine, _ = make_engine(tiny_dir, rows=8, slots=2, adapters=2, max_wait_s=0.0)
    got = Collector()
    engine.submit(request("running", "ad0", [5, 6], n=40), got)
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.num_running == 1
    for i in range(4):  # accepted for ad0's current version, still queued when it is replaced
        engine.submit(request(f"old{i}", "ad0", [5, 6 + i], n=4), got)
    engine.submit(request("other", "ad1", [7, 8], n=4), got)
    engine.unload_adapter("ad0")  # the version is replaced: it drains and leaves its slot
    engine._drain_inbox(block=False)
    engine.step()
    assert engine.num_running == 6, engine.stats()  # everyone admitted in the same step
    engine.run_until_idle()
    assert {e.finish_reason for e in got.final.values()} == {"length"}
    assert engine.slot_table is not None and "ad0" not in engine.slot_table.resident()
