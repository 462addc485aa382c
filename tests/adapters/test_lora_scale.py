"""Per-request adapter scale (`lora_scale`): rows of one adapter at scales 0, 0.5, 1 and 2 and a
base row in one batch equal PEFT with its LoRA scaling multiplied likewise, in prefill and decode,
eager and compiled (no recompilation); the prefix cache keeps scales apart; the HTTP field."""

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
from tests.adapters.helpers import load_weights, make_peft_adapter
from tests.server.families import make_family
from tests.server.fakes import Collector

SCALES = [0.0, 0.5, 1.0, 2.0]
PROMPT = [5, 9, 14, 3, 30, 31, 7, 7, 60, 61, 62]


def peft_logits(peft_model: Any, ids: torch.Tensor, scale: float) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer

    saved = {m: dict(m.scaling) for m in peft_model.modules() if isinstance(m, LoraLayer)}
    for module in saved:
        module.scaling = {k: v * scale for k, v in module.scaling.items()}
    try:
        with torch.no_grad():
            return peft_model(ids).logits[0]
    finally:
        for module, scaling in saved.items():
            module.scaling = scaling


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("scale")
    hf = make_family("qwen2", root / "base", seed=2)
    peft_model = make_peft_adapter(hf, root / "ad", seed=8, r=8, lora_alpha=16, target_modules="all-linear")
    return root / "base", root / "ad", peft_model


def test_scaled_rows_in_one_batch_equal_peft(setup: tuple[Path, Path, Any]) -> None:
    base, adapter, peft_model = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=5, max_len=32)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    bank.load(0, load_weights(adapter, bank))
    ids = torch.tensor([PROMPT])
    seq = ids.shape[1] - 1
    slots, scales = torch.tensor([0, 0, 0, 0, bank.null_slot]), [*SCALES, 1.0]
    prefill = model.logits(model(ids[:, :seq].expand(5, seq), torch.arange(seq)[None].expand(5, seq), row_start=0,
                                 kv_len=seq, lora=bank.batch(slots, scales)))
    step = model.logits(model(ids[:, seq:].expand(5, 1), torch.full((5, 1), seq), row_start=0, kv_len=32,
                              lora=bank.batch(slots, scales)))
    got = torch.cat([prefill, step], dim=1)  # [5, S, V]
    expected = [peft_logits(peft_model, ids, s) for s in SCALES]
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
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=4, max_len=64)
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
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for i, scale in enumerate(SCALES):
        saved = [dict(m.scaling) for m in layers]
        for m in layers:
            m.scaling = {k: v * scale for k, v in m.scaling.items()}
        with torch.no_grad():
            want = peft_model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
        for m, scaling in zip(layers, saved):
            m.scaling = scaling
        assert got.tokens[str(i)] == want, f"scale {scale}"


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
    shared = engine()
    assert run(shared, 1.0, "a") == cold[1.0]
    hits = shared.blocks.prefix.hits.get("ad", 0)
    assert run(shared, 0.5, "b") == cold[0.5]
    assert shared.blocks.prefix.hits.get("ad", 0) == hits  # no hit across scales
    assert run(shared, 0.5, "d") == cold[0.5]
    assert shared.blocks.prefix.hits.get("ad", 0) > hits  # a hit at the same scale
