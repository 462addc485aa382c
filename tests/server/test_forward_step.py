"""The token-level step: one forward per engine step carries decode tokens and prompt chunks
together, under a token budget, reading nothing back from the device but the sampled tokens,
with every row's numbers what they are alone."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from server.engine import Engine
from server.linear import onednn_packing_available
from server.model import Transformer
from server.forward_batch import ForwardBatch, PromptChunk
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.fakes import Collector
from tests.server.test_adapter_scheduling import random_adapters
from tests.server.test_batch_invariance import LogitTap

GREEDY = SamplingParams(temperature=0)
needs_packing = pytest.mark.skipif(not onednn_packing_available(), reason="one forward per step needs packed weights")


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextmanager
def forwards(model: Transformer) -> Iterator[list[ForwardBatch]]:
    """Record every ForwardBatch the model runs."""
    seen: list[ForwardBatch] = []
    real = model.forward_batch

    def spy(batch: ForwardBatch, layer_fn: object = None) -> torch.Tensor:
        seen.append(batch)
        return real(batch, layer_fn)  # type: ignore[arg-type]

    model.forward_batch = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del model.forward_batch


def make_engine(folder: Path, *, slots: int = 0, budget: int | None = None, chunk: int = 512,
                pack: bool = True, long_prompt: int = 0) -> Engine:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=4, max_len=256, pack=pack)
    bank = SlotBank(model, num_slots=slots, max_rank=8) if slots else None
    engine = Engine(ModelRunner(model, bank), eos_ids=frozenset(), prefill_chunk=chunk,
                    max_num_batched_tokens=budget, slot_table=SlotTable(slots) if slots else None,
                    long_prefill_token_threshold=long_prompt)
    if bank is not None:
        engine.adapter_weights = random_adapters(bank, slots).__getitem__
    return engine


def greedy(rid: str, ids: list[int], n: int = 6, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(rid, ids, max_tokens=n, sampling=GREEDY, adapter=adapter)


@needs_packing
def test_decode_rows_and_arriving_prompts_share_one_forward(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir, slots=2, budget=64, chunk=16)
    alone = {}
    for rid, ids, adapter in [("a", prompt(1, 5), "ad0"), ("b", prompt(2, 40), "ad1"), ("c", prompt(3, 9), None)]:
        solo = make_engine(tiny_dir, slots=2, budget=64, chunk=16)
        got = Collector()
        solo.submit(greedy(rid, ids, adapter=adapter), got)
        solo.run_until_idle()
        alone[rid] = got.tokens[rid]
    got = Collector()
    engine.submit(greedy("a", prompt(1, 5), adapter="ad0"), got)
    engine._drain_inbox(block=False)
    engine.step()  # a's prompt
    engine.step()  # a decodes
    engine.submit(greedy("b", prompt(2, 40), adapter="ad1"), got)
    engine.submit(greedy("c", prompt(3, 9)), got)
    engine._drain_inbox(block=False)
    with forwards(engine.runner.model) as seen:
        engine.step()
    (batch,) = seen  # one forward: a's decode token, b's first chunks and c's whole prompt
    assert batch.decode_rows >= 1 and [(c.row, c.length) for c in batch.chunks] == [(1, 16), (1, 16), (1, 8), (2, 9)]
    assert batch.lora is not None and [s[1:] for s in batch.lora.segments] == [(16, 1, 1.0), (16, 1, 1.0), (8, 1, 1.0)]
    engine.run_until_idle()
    assert got.tokens == alone  # tokens identical to each request served alone


@needs_packing
def test_a_prompt_token_budget_paces_long_prompts_behind_running_streams(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir, budget=24, chunk=64)
    assert engine.chunk_size == 24  # a chunk never exceeds the budget
    got = Collector()
    for i in range(3):
        engine.submit(greedy(f"s{i}", prompt(i, 4), n=40), got)
    engine._drain_inbox(block=False)
    engine.step()
    engine.submit(greedy("long", prompt(9, 100), n=2), got)
    engine._drain_inbox(block=False)
    with forwards(engine.runner.model) as seen:
        before = {rid: len(tokens) for rid, tokens in got.tokens.items()}
        for _ in range(5):
            engine.step()
    # Each step: the 3 streams' tokens plus one 24-token chunk (the oldest prompt always advances).
    assert [b.num_tokens - b.decode_rows for b in seen] == [24, 24, 24, 24, 4]
    assert all(len(got.tokens[f"s{i}"]) - before[f"s{i}"] == 5 for i in range(3))  # one token per step each
    engine.run_until_idle()
    assert len(got.tokens["long"]) == 2


@needs_packing
def test_long_prompts_arriving_take_one_chunk_per_step_while_streams_decode(tiny_dir: Path) -> None:
    def serve(engine: Engine, record: bool) -> tuple[Collector, list[int]]:
        got = Collector()
        engine.submit(greedy("s", prompt(1, 4), n=30), got)
        engine._drain_inbox(block=False)
        engine.step()
        for i in range(2):
            engine.submit(greedy(f"long{i}", prompt(5 + i, 60), n=2), got)
        engine.submit(greedy("short", prompt(9, 10), n=2), got)
        engine._drain_inbox(block=False)
        with forwards(engine.runner.model) as seen:
            for _ in range(3):
                engine.step()
        engine.run_until_idle()
        return got, [b.num_tokens - b.decode_rows for b in seen] if record else []

    got, prompt_tokens = serve(make_engine(tiny_dir, budget=64, chunk=16, long_prompt=32), True)
    # One 16-token chunk of the oldest long prompt, and the short prompt whole, per step.
    assert prompt_tokens == [16 + 10, 16, 16]
    unlimited, prompt_tokens = serve(make_engine(tiny_dir, budget=64, chunk=16), True)
    assert prompt_tokens[0] == 60  # without the limit the first long prompt fills the budget: all of it
    assert got.tokens == unlimited.tokens  # the same tokens however the chunks were scheduled


def test_a_step_reads_back_only_the_sampled_tokens(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_dir, slots=2, chunk=8)
    got = Collector()
    engine.submit(greedy("a", prompt(1, 5), adapter="ad0"), got)
    engine.submit(greedy("b", prompt(2, 20)), got)
    engine._drain_inbox(block=False)
    engine.step()
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=5)
    engine.submit(GenerationRequest("c", prompt(3, 12), max_tokens=6, sampling=seeded, adapter="ad1"), got)
    engine.submit(GenerationRequest("d", prompt(4, 3), max_tokens=6, sampling=SamplingParams(temperature=1.0)), got)
    engine._drain_inbox(block=False)
    engine._admit()
    reads: list[str] = []
    for name in ("tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _real: object = real, _name: str = name) -> object:
            reads.append(_name)
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    engine.step()
    monkeypatch.undo()
    assert reads == ["tolist"]  # the sampled tokens, once for the whole step


def chunk_logits(runner: ModelRunner, rows: Sequence[int], chunks: Sequence[PromptChunk]) -> dict[int, torch.Tensor]:
    tap = LogitTap(runner)
    runner.step(rows, chunks)
    del runner._sample
    return {row: values[0] for row, values in tap.rows.items()}


@pytest.mark.parametrize("pack", [True, False], ids=["one-forward", "fixed-rows"])
def test_a_prompts_first_logits_do_not_depend_on_what_shares_its_step(tiny_dir: Path, pack: bool) -> None:
    if pack and not onednn_packing_available():
        pytest.skip("no oneDNN weight packing in this torch build")
    model = build_model(tiny_dir, dtype=torch.float32, device="cpu", max_rows=8, max_len=256, pack=pack)
    bank = SlotBank(model, num_slots=3, max_rank=8)
    for slot, weights in enumerate(random_adapters(bank, 3).values()):
        bank.load(slot, weights)
    runner = ModelRunner(model, bank)
    target = prompt(7, 30)

    def run(others: list[tuple[int, list[int], int | None]], decoding: list[tuple[int, int | None]]) -> torch.Tensor:
        for row in range(8):
            runner.free_row(row)
        for row, slot in decoding:  # rows that decode in the same step
            runner.reset_row(row, GREEDY, seed=0, slot=slot)
            runner.prefill(row, prompt(row, 11), start=0, last=True)
        runner.reset_row(3, GREEDY, seed=0, slot=1)
        runner.step([], [PromptChunk(3, target[:16], 0, False)])  # an earlier chunk, its own step
        for row, ids, slot in others:
            runner.reset_row(row, GREEDY, seed=0, slot=slot)
        chunks = [PromptChunk(row, ids, 0, True) for row, ids, _ in others]
        chunks.insert(len(chunks) // 2, PromptChunk(3, target[16:], 16, True))
        return chunk_logits(runner, [row for row, _ in decoding], chunks)[3]

    alone = run([], [])
    assert torch.equal(run([(5, prompt(5, 40), 0)], [(0, None), (1, 2)]), alone)
    assert torch.equal(run([(5, prompt(5, 3), None), (6, prompt(6, 70), 2)], [(7, 1)]), alone)


def test_row_resident_lora_weights_follow_every_slot_change(tiny_dir: Path) -> None:
    """Each decode row computes on its own copy of its slot's weights: the copy must follow the
    row changing slot, the slot being rewritten (hotswap) and the row leaving adapters (zeros),
    in the whole-block and the few-rows forms alike."""
    model = build_model(tiny_dir, dtype=torch.float32, device="cpu", max_rows=8, max_len=64)
    bank = SlotBank(model, num_slots=3, max_rank=8)
    adapters = list(random_adapters(bank, 4).values())
    for slot in range(3):
        bank.load(slot, adapters[slot])
    null = bank.null_slot
    tokens = torch.arange(20, 28)[:, None]  # [8, 1]
    positions = torch.zeros(8, 1, dtype=torch.int64)

    def together(slots: list[int]) -> torch.Tensor:
        lora = bank.batch(torch.tensor(slots))
        return model.logits(model(tokens, positions, row_start=0, kv_len=64, lora=lora))[:, 0]

    def alone(slots: list[int]) -> torch.Tensor:
        rows = [model.logits(model(tokens[r : r + 1], positions[r : r + 1], row_start=r, kv_len=64,
                                   lora=bank.batch(torch.tensor([slots[r]]))))[0, 0] for r in range(8)]
        return torch.stack(rows)

    for slots in ([0, 1, 2, null, 0, 1, 2, null],  # the whole block
                  [2, 2, null, 0, 1, null, 0, 1],  # rows change slots, rows leave adapters
                  [null, null, null, 1, null, null, null, null]):  # one row: only its weights gathered
        assert torch.equal(together(slots), alone(slots)), slots
    bank.load(1, adapters[3])  # hotswap a slot that rows' copies hold
    for slots in ([null, null, null, 1, null, null, null, null], [1, 1, 1, 1, 1, 1, 1, 1]):
        got = together(slots)
        assert torch.equal(got, alone(slots)), slots
    fresh = SlotBank(model, num_slots=3, max_rank=8)  # nothing stale in a bank that never held the old one
    for slot, index in ((0, 0), (1, 3), (2, 2)):
        fresh.load(slot, adapters[index])
    lora = fresh.batch(torch.tensor([1] * 8))
    assert torch.equal(model.logits(model(tokens, positions, row_start=0, kv_len=64, lora=lora))[:, 0], got)
