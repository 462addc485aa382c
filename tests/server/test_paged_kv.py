"""The paged KV cache: block bookkeeping, admission by memory, preemption, and prefix caching
keyed by adapter version, each held to the output of a run without them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights
from server.engine import Engine
from server.kv_blocks import BlockPool, block_hashes
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.fakes import Collector
from tests.server.test_adapter_scheduling import random_adapters
from tests.server.test_batch_invariance import LogitTap

MAX_LEN = 128


# ---- the block pool --------------------------------------------------------------------------
def test_blocks_are_counted_shared_and_evicted_least_recently_released_first() -> None:
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.available == 2 and pool.allocate(3) is None and pool.available == 2
    hashes = list(block_hashes(None, [1, 2, 3, 4], 2))
    for block, digest in zip(a, hashes):
        pool.register(block, digest)
    assert pool.match(hashes) == [0, 1] and pool.references == 4  # shared: held twice
    pool.release(a)
    assert pool.used == 2  # still held by the second holder
    pool.release(a)
    assert pool.used == 0 and pool.cached == 2 and pool.available == 4
    # A chain: the same second block behind another first one is another key.
    assert pool.peek(hashes) == 2 and pool.peek(list(block_hashes(None, [9, 9, 3, 4], 2))) == 0
    taken = pool.allocate(3)  # two free blocks, then the least recently released cached one
    assert taken is not None and sorted(taken[:2]) == [2, 3] and taken[2] == 1  # the prefix's head outlives its tail
    assert pool.peek(hashes) == 1 and pool.check() is None
    with pytest.raises(RuntimeError):
        pool.release([3, 3])


def test_hashes_depend_on_the_adapter_version_and_every_earlier_token() -> None:
    tokens = list(range(10, 42))
    base = list(block_hashes(None, tokens, 16))
    assert len(base) == 2 and len(list(block_hashes(None, tokens[:31], 16))) == 1  # full blocks only
    assert list(block_hashes("a@1", tokens, 16)) != base
    assert list(block_hashes("a@1", tokens, 16))[0] != list(block_hashes("a@2", tokens, 16))[0]
    other = list(block_hashes(None, [11, *tokens[1:]], 16))
    assert other[1] != base[1]  # same second block, different first: a different key
    pool = BlockPool(4, 16)
    blocks = pool.allocate(2)
    assert blocks is not None
    for block, digest in zip(blocks, list(block_hashes("a@1", tokens, 16))):
        pool.register(block, digest, ("a@1",))
    pool.release(blocks)
    assert pool.forget_adapter("a@1") == 2 and pool.cached == 0 and pool.available == 4
    assert pool.peek(list(block_hashes("a@1", tokens, 16))) == 0


def test_an_adapter_prefix_is_keyed_by_the_lora_window_it_was_computed_under() -> None:
    """The rank window follows the largest loaded rank, and an adapter's keys and values depend
    on it in their last bits: a prefix computed under one window is not served under another."""
    from server.engine_blocks import EngineBlocks
    from server.sequence import Sequence

    window = [8]
    blocks = EngineBlocks(BlockPool(16, 16), chunk_size=16, lora_window=lambda: window[0])

    def prefill(rid: str, change_to: int | None = None) -> Sequence:
        seq = Sequence(request(rid, list(range(3, 43)), adapter="x@1"), eos_ids=frozenset(), max_len=128)
        blocks.start(seq)
        hit = seq.prefilled
        assert blocks.reserve(seq, seq.prefill_len)
        if change_to is not None:
            window[0] = change_to  # a higher-rank adapter was loaded while this one prefilled
        seq.prefilled = seq.prefill_len
        blocks.prefilled(seq)
        blocks.release(seq)
        seq.prefilled = hit
        return seq

    assert prefill("a").prefilled == 0 and blocks.pool.cached == 2
    assert prefill("b").prefilled == 32  # same window: both full blocks found
    window[0] = 16
    assert prefill("c", change_to=32).prefilled == 0  # another window: nothing found ...
    assert blocks.pool.cached == 2  # ... and what c computed under 32 is not filed under 16
    assert prefill("d").prefilled == 0 and blocks.pool.cached == 4  # under 32 now: computed, filed
    assert prefill("e").prefilled == 32


# ---- engines -----------------------------------------------------------------------------------
def make_engine(folder: Path, *, blocks: int | None = None, rows: int = 4, prefix: bool = True,
                shuffle: bool = False, chunk: int = 16) -> tuple[Engine, dict[str, AdapterWeights]]:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=rows, max_len=MAX_LEN,
                        kv_blocks=blocks, block_size=16)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    store = random_adapters(bank, 3)
    engine = Engine(ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(2),
                    adapter_weights=store.__getitem__, prefill_chunk=chunk, prefix_caching=prefix)
    if shuffle:  # blocks handed out in no particular order: tables are scattered over the pool
        random.Random(0).shuffle(engine.blocks.pool._free)
    return engine, store


def request(rid: str, prompt: list[int], n: int = 8, adapter: str | None = None, seed: int | None = None) -> GenerationRequest:
    sampling = SamplingParams(temperature=0) if seed is None else SamplingParams(temperature=0.9, top_p=0.9, seed=seed)
    return GenerationRequest(rid, prompt, max_tokens=n, sampling=sampling, adapter=adapter, ignore_eos=True)


def run(engine: Engine, *requests: GenerationRequest) -> Collector:
    got = Collector()
    for r in requests:
        engine.submit(r, got)
    engine.run_until_idle()
    assert engine.blocks.pool.used == 0 and engine.blocks.pool.check() is None  # nothing leaked
    return got


def prompt(seed: int, length: int) -> list[int]:
    g = random.Random(seed)
    return [g.randrange(3, 90) for _ in range(length)]


MIX = [
    request("a", prompt(1, 40), 12),
    request("b", prompt(2, 70), 10, adapter="ad0"),
    request("c", prompt(3, 5), 16, adapter="ad1", seed=7),
    request("d", prompt(4, 33), 9, adapter="ad2"),
    request("e", prompt(5, 17), 14, seed=3),
]


def alone(folder: Path, r: GenerationRequest) -> list[int]:
    engine, _ = make_engine(folder, prefix=False)
    return run(engine, r).tokens[r.request_id]


def test_paging_changes_no_output(tiny_dir: Path) -> None:
    """Each request alone on a pool as large as fixed rows would be, against all of them in one
    mixed batch on a pool whose blocks are scattered: the same tokens (greedy and seeded)."""
    want = {r.request_id: alone(tiny_dir, r) for r in MIX}
    engine, _ = make_engine(tiny_dir, shuffle=True, prefix=False)
    got = run(engine, *MIX)
    assert got.tokens == want
    assert engine.blocks.preemptions == 0


def test_a_small_pool_preempts_and_every_request_still_gets_its_output(tiny_dir: Path) -> None:
    """10 blocks (160 positions) for requests that need 45 to 86 positions each: admission waits
    for memory, decoding rows that run dry preempt the newest, and everything completes with
    the output it has alone."""
    want = {r.request_id: alone(tiny_dir, r) for r in MIX}
    engine, _ = make_engine(tiny_dir, blocks=10, shuffle=True, prefix=False)
    got = run(engine, *MIX)
    assert got.tokens == want
    assert engine.blocks.preemptions > 0
    assert all(e.finish_reason == "length" for e in got.final.values())
    assert engine.stats()["kv_cache"]["preemptions"] == engine.blocks.preemptions  # type: ignore[index]


def test_a_pool_smaller_than_one_sequence_is_refused(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="fewer than one sequence"):
        make_engine(tiny_dir, blocks=7)  # 112 positions for max_model_len 128


def logits_of(engine: Engine, r: GenerationRequest) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and every sampled logit row of `r`, run alone on `engine` (row 0)."""
    tap = LogitTap(engine.runner)
    tokens = run(engine, r).tokens[r.request_id]
    del engine.runner._sample  # the tap was an instance attribute over the method
    return tokens, tap.rows[0]


def test_a_prefix_hit_gives_exactly_the_cold_output(tiny_dir: Path) -> None:
    shared = prompt(10, 70)
    first, second = request("x", shared + prompt(11, 9)), request("y", shared + prompt(12, 20), 12)
    cold_engine, _ = make_engine(tiny_dir)
    cold = logits_of(cold_engine, second)
    engine, _ = make_engine(tiny_dir, shuffle=True)
    run(engine, first)
    hits_before = engine.blocks.prefix.hits.get("base", 0)
    warm = logits_of(engine, second)
    assert engine.blocks.prefix.hits["base"] - hits_before == 64  # 4 whole chunks of 16 of the 70
    assert warm[0] == cold[0]
    assert all(torch.equal(w, c) for w, c in zip(warm[1], cold[1], strict=True))
    # A prompt that is all cached prefix still computes its last token itself.
    warm = logits_of(engine, request("z", shared, 6))
    cold = logits_of(make_engine(tiny_dir)[0], request("z", shared, 6))
    assert warm[0] == cold[0] and all(torch.equal(w, c) for w, c in zip(warm[1], cold[1], strict=True))


def test_no_prefix_is_shared_across_adapters_or_versions(tiny_dir: Path) -> None:
    shared = prompt(20, 64)
    engine, store = make_engine(tiny_dir)
    # One after the other, so the second could find the first's blocks if keys were shared.
    run(engine, request("base", shared + [5]))
    run(engine, request("a0", shared + [5], adapter="ad0"))
    assert engine.blocks.prefix.hits.get("ad0", 0) == 0  # the base model's prefix is not ad0's
    run(engine, request("base-again", shared + [6]))
    assert engine.blocks.prefix.hits["base"] == 64  # ... though it is cached
    run(engine, request("a0-again", shared + [6], adapter="ad0"))
    assert engine.blocks.prefix.hits["ad0"] == 64

    # Replace ad0 (a new version key, other weights): the next identical request is computed fresh.
    store["ad0@v2"] = store["ad1"]
    fresh = run(engine, request("v2", shared + [6], adapter="ad0@v2")).tokens["v2"]
    assert engine.blocks.prefix.hits["ad0"] == 64  # statistics are by name: no new hit
    cold_engine, cold_store = make_engine(tiny_dir, prefix=False)
    cold_store["ad0@v2"] = cold_store["ad1"]
    assert fresh == run(cold_engine, request("v2", shared + [6], adapter="ad0@v2")).tokens["v2"]

    # Retiring the old version (as a replace or delete does) drops its blocks at once.
    cached = engine.blocks.pool.cached
    done = engine.unload_adapter("ad0")
    engine._drain_inbox(block=False)  # no engine thread here: run the command inline
    done.result(timeout=1)
    assert engine.blocks.pool.cached == cached - 4
    run(engine, request("a0-after", shared + [6], adapter="ad0"))
    assert engine.blocks.prefix.hits["ad0"] == 64  # nothing of the retired version was found


def test_cancellations_and_failures_leak_no_block(tiny_dir: Path) -> None:
    engine, _ = make_engine(tiny_dir, blocks=12, shuffle=True)
    got = Collector()
    g = random.Random(5)
    for i in range(30):
        engine.submit(request(f"r{i}", prompt(100 + i % 4, g.randrange(5, 90)), g.randrange(1, 30),
                              adapter=g.choice([None, "ad0", "ad1", "missing"])), got)
        for _ in range(g.randrange(0, 3)):
            engine.step()
        if g.random() < 0.3:
            engine.cancel(f"r{g.randrange(0, i + 1)}")
        engine._drain_inbox(block=False)
    engine.run_until_idle()
    pool = engine.blocks.pool
    assert len(got.final) == 30 and pool.used == 0 and pool.references == 0 and pool.check() is None
    assert pool.available == pool.num_blocks and engine.health() is None
    # The run did what the name says: cancellations, failures (an unknown adapter) and preemptions.
    assert {"abort", "error", "length"} <= {event.finish_reason for event in got.final.values()}
    assert engine.blocks.stats().preemptions > 0


def test_a_kv_budget_below_one_request_stops_the_start(tiny_dir: Path) -> None:
    from config.settings import Settings
    from server.bootstrap import kv_plan
    from server.errors import KVCacheBudgetError
    from server.model_config import load_model_config

    cfg = load_model_config(tiny_dir)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    fits = Settings(max_num_seqs=4, max_model_len=128, kv_cache_memory=128 * per_token)
    assert kv_plan(fits, cfg, 4) == 8  # exactly one request of 128 positions
    big = Settings(max_num_seqs=4, max_model_len=128, kv_cache_memory="1GiB")
    assert kv_plan(big, cfg, 4) == 4 * 8  # never more than max_num_seqs x max_model_len
    with pytest.raises(KVCacheBudgetError, match="one request of --max-model-len 128 needs"):
        kv_plan(Settings(max_num_seqs=4, max_model_len=128, kv_cache_memory=127 * per_token), cfg, 4)
