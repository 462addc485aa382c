"""Per-request adapter scale (`lora_scale`): rows of one adapter at scales 0, 0.5, 1, 2 and -1 and
a base row in one batch equal PEFT with its LoRA scaling multiplied likewise, in prefill and decode,
eager and compiled (no recompilation); the prefix cache keeps scales apart. The HTTP field is
tested in tests/server/test_hostile_http.py (refusals) and tests/e2e/test_adapters_http.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from server.engine import Engine
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, mixed_batch_logits, scaled_lora
from tests.server.families import hf_greedy, make_family
from tests.server.fakes import Collector

SCALES = [0.0, 0.5, 1.0, 2.0, -1.0]
PROMPT = [5, 9, 14, 3, 30, 31, 7, 7, 60, 61, 62]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("scale")
    hf = make_family("qwen2", root / "base", seed=2)
    peft_model = make_peft_adapter(hf, root / "ad", seed=8, r=8, lora_alpha=16, target_modules="all-linear")
    return root / "base", root / "ad", peft_model


def test_scaled_rows_in_one_batch_equal_peft(setup: tuple[Path, Path, Any]) -> None:
    base, adapter, peft_model = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=len(SCALES) + 1, max_len=32)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    bank.load(0, load_weights(adapter, bank))
    ids = torch.tensor([PROMPT])
    got = mixed_batch_logits(model, bank, ids, [0] * len(SCALES) + [bank.null_slot], [*SCALES, 1.0])  # [rows, S, V]
    expected = []
    for scale in SCALES:
        with scaled_lora(peft_model, scale), torch.no_grad():
            expected.append(peft_model(ids).logits[0])
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(ids).logits[0]
    assert (expected[3] - expected[2]).abs().max() > 1e-3  # the scale really matters
    assert (expected[0] - base_logits).abs().max() < 1e-5  # PEFT at scale 0 is the base model
    for row, want in enumerate([*expected, base_logits]):
        assert (got[row] - want).abs().max().item() < 1e-4, f"row {row}"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engine_serves_each_request_at_its_scale(setup: tuple[Path, Path, Any], compile: bool) -> None:
    """Greedy tokens of requests at four scales, together, equal PEFT's scaled generate; under
    compile the warm graphs serve every scale without recompiling."""
    base, adapter, peft_model = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=len(SCALES), max_len=64)
    bank = SlotBank(model, num_slots=1, max_rank=8, fixed_window=compile)
    weights = load_weights(adapter, bank, "ad")
    if compile:
        torch._dynamo.reset()
    engine = Engine(ModelRunner(model, bank, compile=compile), eos_ids=frozenset(), prefill_chunk=5,
                    slot_table=SlotTable(1), adapter_weights={"ad": weights}.__getitem__)
    if compile:
        engine.runner.warm_up()
    got = Collector()
    for i, scale in enumerate(SCALES):
        engine.submit(GenerationRequest(str(i), PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0),
                                        adapter="ad", lora_scale=scale), got)
    engine.run_until_idle()
    if compile:
        assert engine.runner.recompilations == 0
    wants = []
    for i, scale in enumerate(SCALES):
        with scaled_lora(peft_model, scale):
            wants.append(hf_greedy(peft_model, PROMPT, 8))
        assert got.tokens[str(i)] == wants[-1], f"scale {scale}"
    assert len({tuple(w) for w in wants}) == len(SCALES)  # every scale gives other tokens here


def test_prefix_cache_keeps_scales_apart(setup: tuple[Path, Path, Any]) -> None:
    """The same prompt on the same adapter at another scale has other keys and values: no hit
    across scales, a hit at the same scale, and tokens equal to a cold run either way."""
    base, adapter, _ = setup

    def engine() -> Engine:
        model = build_model(base, dtype=torch.float32, device="cpu", max_rows=2, max_len=128)
        bank = SlotBank(model, num_slots=1, max_rank=8)
        weights = load_weights(adapter, bank, "ad")
        return Engine(ModelRunner(model, bank), eos_ids=frozenset(), prefill_chunk=16, slot_table=SlotTable(1),
                      adapter_weights={"ad": weights}.__getitem__, prefix_caching=True)

    prompt = [3 + (i * 7) % 90 for i in range(70)]

    def run(e: Engine, scale: float, rid: str) -> list[int]:
        got = Collector()
        e.submit(GenerationRequest(rid, prompt, max_tokens=6, sampling=SamplingParams(temperature=0), adapter="ad",
                                   lora_scale=scale), got)
        e.run_until_idle()
        return got.tokens[rid]

    cold = {scale: run(engine(), scale, "c") for scale in (1.0, 0.5)}
    assert cold[1.0] != cold[0.5]  # so equal-to-cold below tells the scales apart
    shared = engine()
    assert run(shared, 1.0, "a") == cold[1.0]
    hits = shared.blocks.prefix.hits.get("ad", 0)
    assert run(shared, 0.5, "b") == cold[0.5]
    assert shared.blocks.prefix.hits.get("ad", 0) == hits  # no hit across scales
    assert run(shared, 0.5, "d") == cold[0.5]
    assert shared.blocks.prefix.hits.get("ad", 0) > hits  # a hit at the same scale
