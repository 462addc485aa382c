"""Several adapters in one request: a row adds the weighted sum of its adapters' contributions,
which is PEFT's `add_weighted_adapter(..., combination_type="cat")`. Two- and three-adapter mixes
(negative weights included) share a batch with a one-adapter row and a base row, in prefill and
decode, eager (one-token segments) and dense (the compiled formulation); the engine serves mixes
with greedy tokens equal to PEFT's, compiled without recompiling; a mix needs all of its
adapters in slots at once. HTTP: tests/server/test_hostile_http.py, tests/e2e/test_adapters_http.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.lora_layer import Terms
from adapters.slot_bank import SlotBank
from server.sampling import SamplingParams
from server.sequence import AdapterUse, GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, slot_engine, terms_batch_logits, unwrap
from tests.server.families import hf_greedy, make_family
from tests.server.fakes import Collector

PROMPT = [5, 9, 14, 3, 30, 31, 7, 7, 60, 61, 62]
SPECS = [{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
         {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]},
         {"r": 8, "lora_alpha": 32, "target_modules": ["v_proj", "o_proj", "down_proj"]}]
MIXES: list[list[tuple[int, float]]] = [[(0, 0.7), (1, 0.5)], [(0, 1.0), (1, -0.5), (2, 0.3)], [(2, 1.0)]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[torch.Tensor], list[list[int]]]:
    """A Qwen2 base and three PEFT adapters; PEFT's logits for PROMPT and greedy tokens under each
    mix of MIXES (through add_weighted_adapter), then under the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mix")
    hf = make_family("qwen2", root / "base", seed=4)
    folders = []
    for i, spec in enumerate(SPECS):
        hf = unwrap(make_peft_adapter(hf, root / f"a{i}", seed=40 + i, **spec))
        folders.append(root / f"a{i}")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), folders[0],
                                           adapter_name="a0").eval()
    for i in (1, 2):
        peft_model.load_adapter(folders[i], adapter_name=f"a{i}")
    ids = torch.tensor([PROMPT])
    logits, tokens = [], []
    for m, mix in enumerate(MIXES):
        peft_model.add_weighted_adapter([f"a{i}" for i, _ in mix], [w for _, w in mix], f"m{m}", combination_type="cat")
        peft_model.set_adapter(f"m{m}")
        with torch.no_grad():
            logits.append(peft_model(ids).logits[0])
        tokens.append(hf_greedy(peft_model, PROMPT, 8))
    with torch.no_grad(), peft_model.disable_adapter():
        logits.append(peft_model(ids).logits[0])
        tokens.append(hf_greedy(peft_model, PROMPT, 8))
    assert len({tuple(t) for t in tokens}) == len(tokens)  # every mix is its own model here
    return root / "base", folders, logits, tokens


@pytest.mark.parametrize("dense", [False, True], ids=["eager", "dense"])
def test_mixed_rows_in_one_batch_equal_peft(setup: Any, dense: bool) -> None:
    base, folders, expected, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=4, max_len=32)
    bank = SlotBank(model, num_slots=3, max_rank=8, fixed_window=dense)
    for slot, folder in enumerate(folders):
        bank.load(slot, load_weights(folder, bank, f"a{slot}"))
    rows: list[Terms] = [tuple(mix) for mix in MIXES] + [()]
    lora = bank.mix_batch(rows)
    assert (lora.mix is not None) == dense
    got = terms_batch_logits(model, bank, torch.tensor([PROMPT]), lora)  # [rows, S, V]
    for row, want in enumerate(expected):
        assert (got[row] - want).abs().max().item() < 1e-4, f"row {row}"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engine_serves_mixes_next_to_single_and_base_requests(setup: Any, compile: bool) -> None:
    base, folders, _, wants = setup
    engine, weights = slot_engine(base, folders, slots=3, rows=4, compile=compile)
    got = Collector()
    for m, mix in enumerate(MIXES):
        uses = tuple(AdapterUse(f"a{i}", weights[f"a{i}"], w) for i, w in mix)
        engine.submit(GenerationRequest(str(m), PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0),
                                        mix=uses), got)
    engine.submit(GenerationRequest("base", PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0)), got)
    engine.run_until_idle()
    if compile:
        assert engine.runner.recompilations == 0
    for m in range(len(MIXES)):
        assert got.tokens[str(m)] == wants[m], f"mix {m}"
    assert got.tokens["base"] == wants[-1]
    assert engine.slot_table is not None and engine.slot_table.references() == [0, 0, 0]


def test_a_mix_waits_for_all_of_its_slots_and_one_that_never_fits_is_refused(setup: Any) -> None:
    base, folders, _, wants = setup
    engine, weights = slot_engine(base, folders, slots=2, rows=4)
    got = Collector()

    def request(rid: str, mix: list[tuple[int, float]]) -> GenerationRequest:
        uses = tuple(AdapterUse(f"a{i}", weights[f"a{i}"], w) for i, w in mix)
        return GenerationRequest(rid, PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0), mix=uses)

    engine.submit(request("single", MIXES[2]), got)  # takes one of the two slots
    engine.submit(request("pair", MIXES[0]), got)  # needs both: waits until "single" ends
    engine.submit(request("triple", MIXES[1]), got)  # three adapters, two slots: never
    engine.run_until_idle()
    assert got.tokens["single"] == wants[2] and got.tokens["pair"] == wants[0]
    assert "only 2 slots" in (got.final["triple"].error or "")
    assert engine.slot_table is not None and engine.slot_table.references() == [0, 0]


def test_a_mixed_row_is_bit_identical_alone_and_among_other_rows(setup: Any) -> None:
    """Batch invariance: a mixing row's logits do not depend on which rows share its step."""
    base, folders, _, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=4, max_len=32)
    bank = SlotBank(model, num_slots=3, max_rank=8)
    for slot, folder in enumerate(folders):
        bank.load(slot, load_weights(folder, bank, f"a{slot}"))
    ids = torch.tensor([PROMPT])
    pair = tuple(MIXES[0])
    alone = terms_batch_logits(model, bank, ids, bank.mix_batch([pair]))[0]
    crowd = [pair, tuple(MIXES[1]), ((2, 1.0),), ((1, 0.25), (2, 2.0))]
    together = terms_batch_logits(model, bank, ids, bank.mix_batch(crowd))[0]
    assert torch.equal(alone, together)


def test_statistics_label_a_mix_by_its_size_only() -> None:
    """Metric labels and prefix statistics stay bounded: combinations of adapters are not names."""
    mix = (AdapterUse("a@1", None, 0.5), AdapterUse("b@2", None, 0.5))
    name_of = lambda key: key.split("@")[0]  # noqa: E731
    assert GenerationRequest("m", [1], 1, mix=mix).label("base", name_of) == "(mix of 2)"
    assert GenerationRequest("s", [1], 1, adapter="a@1").label("base", name_of) == "a"
    assert GenerationRequest("b", [1], 1).label("base", name_of) == "base"


def test_a_zero_weight_leaves_its_adapter_out(setup: Any) -> None:
    """`a0:0+a1` is a1 alone, bit for bit, even when a0's product overflows to inf."""
    base, folders, _, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=2, max_len=32)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    bank.load(1, load_weights(folders[1], bank, "a1"))
    for a, _, b in bank._where.values():  # slot 0: an adapter whose product is inf on any input
        a[0].fill_(1e30)
        b[0].fill_(1e30)
    ids = torch.tensor([PROMPT])
    alone = terms_batch_logits(model, bank, ids, bank.mix_batch([((1, 1.0),)]))
    zero = terms_batch_logits(model, bank, ids, bank.mix_batch([((0, 0.0), (1, 1.0))]))
    assert torch.isfinite(zero).all() and torch.equal(alone, zero)
