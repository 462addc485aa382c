"""One request's numbers never reach another request: freed KV blocks leak nothing (NaN
included), a row whose activations overflow ends alone with an error, and a request that cannot
start gives its row back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from adapters.peft_format import LoraConfig
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights, ModuleLora
from server.engine import Engine
from server.forward_batch import PromptChunk
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest, Sequence
from server.weights import build_model
from tests.server.fakes import Collector

ROWS = 4


def make_engine(folder: Path, adapters: dict[str, AdapterWeights] | None = None) -> Engine:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=ROWS, max_len=64)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    store = adapters or {}
    return Engine(ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(2),
                  adapter_weights=store.__getitem__)


def greedy(rid: str, prompt: list[int], n: int = 8, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(rid, prompt, max_tokens=n, sampling=SamplingParams(temperature=0), adapter=adapter)


def run(engine: Engine, *requests: GenerationRequest) -> Collector:
    got = Collector()
    for request in requests:
        engine.submit(request, got)
    engine.run_until_idle()
    return got


def overflowing_adapter(engine: Engine) -> AdapterWeights:
    """Finite weights whose very first product overflows: x @ A is inf for any input (validation
    would refuse these; the engine must hold even so)."""
    assert engine.runner.bank is not None
    spec = engine.runner.bank.spec()
    modules = {
        name: ModuleLora(a=torch.full((8, d_in), 3e38), b=torch.full((d_out, 8), 1.0), scaling=1.0)
        for name, (d_in, d_out) in spec.targets.items()
    }
    return AdapterWeights("boom", LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"), modules)


def test_the_dense_product_keeps_another_slots_overflow_out_of_a_row() -> None:
    """Compiled decode computes every slot's x @ A for every row and masks by slot: a slot whose
    product overflows to inf must not reach the rows of other slots (inf x 0 is NaN)."""
    from adapters.lora_layer import LoraBatch, LoraSlots

    torch.manual_seed(0)
    d_in, d_out, rank, slots = 16, 12, 4, 3
    a = torch.randn(slots + 1, rank, 1, d_in) * 0.1  # [K+1, R, P, in]
    b = torch.randn(slots + 1, rank, d_out) * 0.1  # [K+1, R, out]
    a[2], a[slots], b[slots] = 3e38, 0.0, 0.0  # slot 2 overflows; the last slot is the null slot
    layer = LoraSlots(a, [b])
    x = torch.randn(4, d_in)  # [T, in]: a decode block of 4 rows
    y = torch.randn(4, d_out)
    row_slots = torch.tensor([slots, 0, 2, 1])
    onehot = torch.nn.functional.one_hot(row_slots, slots + 1).float()
    out = layer.add_to(y.clone(), x, LoraBatch(window=rank, null_slot=slots, decode_tokens=4, mix=onehot))
    assert torch.equal(out[0], y[0])  # the null slot: exactly the base output
    for row in (1, 3):
        slot = int(row_slots[row])
        want = y[row] + (x[row] @ a[slot, :, 0].t()) @ b[slot]
        assert torch.isfinite(out[row]).all() and torch.allclose(out[row], want, atol=1e-6), row
    assert not torch.isfinite(out[2]).all()  # only the overflowing slot's own row is affected


def test_nan_left_in_freed_kv_blocks_cannot_reach_the_next_request(tiny_dir: Path) -> None:
    """A request ends with NaN in every block it held, and then in every block of the pool
    (as if each had been written by one whose adapter overflowed); the next request, which takes
    those blocks, gives exactly what it gives on a fresh engine."""
    prompt = [5, 9, 13, 17, 21, 25]
    want = run(make_engine(tiny_dir), greedy("b", prompt)).tokens["b"]

    engine = make_engine(tiny_dir)
    cache = engine.runner.model.cache
    assert cache is not None
    released: list[list[int]] = []
    real_release = engine.blocks.release

    def poison_then_release(seq: Sequence) -> None:
        released.append(list(seq.blocks))
        for _, buffer in cache.named_buffers():
            buffer[seq.blocks] = float("nan")  # whole blocks, written positions or not
        real_release(seq)

    engine.blocks.release = poison_then_release  # type: ignore[method-assign]
    run(engine, greedy("a", list(range(3, 40)), n=10))  # 47 positions: 3 blocks of 16
    engine.blocks.release = real_release  # type: ignore[method-assign]
    assert [len(blocks) for blocks in released] == [3]
    got = run(engine, greedy("b", prompt))
    assert got.tokens["b"] == want and got.final["b"].finish_reason == "length"
    for _, buffer in cache.named_buffers():
        buffer[: cache.zero_block] = float("nan")  # every real block and the scratch block; the zero block stays zero
    got = run(engine, greedy("c", prompt))
    assert got.tokens["c"] == want


def test_overflowing_activations_end_that_request_alone(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    engine.adapter_weights = {"boom": overflowing_adapter(engine)}.__getitem__
    alone = run(make_engine(tiny_dir), greedy("base", [7, 8, 9], n=12)).tokens["base"]
    got = run(engine, greedy("base", [7, 8, 9], n=12), greedy("bad", [7, 8, 9], n=12, adapter="boom"))
    assert got.final["bad"].finish_reason == "error"
    assert "NaN or infinite" in (got.final["bad"].error or "")
    assert got.tokens["base"] == alone  # the row beside it never noticed
    assert engine.finished["error"] == 1 and engine.health() is None
    assert sorted(engine._free_rows) == list(range(ROWS))
    # The rows it used serve the next requests exactly.
    again = run(engine, *(greedy(f"n{i}", [7, 8, 9], n=12) for i in range(ROWS)))
    assert all(again.tokens[f"n{i}"] == alone for i in range(ROWS))


def test_a_request_that_cannot_start_gives_its_row_back(tiny_dir: Path) -> None:
    """A sampling value the row's int64 tensor cannot hold fails that request alone (the HTTP
    layer refuses it earlier; the engine must not rely on that)."""
    engine = make_engine(tiny_dir)
    bad = GenerationRequest("bad", [5, 6], max_tokens=4, sampling=SamplingParams(temperature=1.0, top_k=10**20))
    got = run(engine, bad, greedy("good", [5, 6]))
    assert got.final["bad"].finish_reason == "error" and "could not start" in (got.final["bad"].error or "")
    assert got.final["good"].finish_reason == "length"
    assert sorted(engine._free_rows) == list(range(ROWS)) and engine.health() is None
    for _ in range(2 * ROWS):  # rows never leak, however many such requests come
        run(engine, GenerationRequest("bad", [5], max_tokens=2, sampling=SamplingParams(top_k=10**20)))
    assert sorted(engine._free_rows) == list(range(ROWS))


def test_health_reports_a_row_held_by_nobody(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    engine._free_rows.pop()  # what the old admission bug did: a row taken, no request holding it
    engine._check_rows()
    assert engine.health() == "1 row(s) are held by no request"


def test_health_reports_a_kv_block_held_by_nobody(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    assert engine.blocks.pool.allocate(1) is not None  # a block taken, no request holding it
    engine._check_rows()
    assert engine.health() == "1 KV block reference(s) are held by no request"


@pytest.mark.parametrize("step", ["prefill", "append"])
def test_an_exception_in_one_request_fails_only_that_request(
    tiny_dir: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_dir)
    alone = run(make_engine(tiny_dir), greedy("ok", [4, 5, 6])).tokens["ok"]
    if step == "prefill":  # a failure in the step's one forward, caused by one prompt
        real = engine.runner.step
        calls: list[int] = []

        def failing_step(rows: list[int], chunks: Sequence[PromptChunk] = ()) -> list[int]:
            calls.append(len(chunks))
            if any(chunk.token_ids[0] == 90 for chunk in chunks):
                raise RuntimeError("boom in prefill")
            return real(rows, chunks)

        monkeypatch.setattr(engine.runner, "step", failing_step)
    else:
        from server.sequence import Sequence as TextSequence

        real_append = TextSequence.append

        def append(self: TextSequence, token: int, now: float, *args: object):  # type: ignore[no-untyped-def]
            if self.request_id == "bad" and len(self.output_ids) == 2:
                raise RuntimeError("boom in append")
            return real_append(self, token, now, *args)

        monkeypatch.setattr(TextSequence, "append", append)
    got = run(engine, greedy("bad", [90, 5, 6]), greedy("ok", [4, 5, 6]))
    if step == "prefill":  # both prompts went into one forward, which failed; then each alone
        assert calls[:3] == [2, 1, 1]
    assert got.final["bad"].finish_reason == "error" and "boom" in (got.final["bad"].error or "")
    assert got.tokens["ok"] == alone
    assert sorted(engine._free_rows) == list(range(ROWS)) and engine.health() is None
