"""Adapters that save the whole embedding and output head (PEFT's modules_to_save), with an
extended vocabulary (8 added tokens): logits and greedy tokens equal PEFT's, prompts that use
the added tokens included, in one batch with a plain LoRA adapter and the base model, eager and
compiled; module slots are a bounded set evicted least recently used; what is not served is
refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.errors import InvalidAdapterError
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from server.engine import Engine
from server.forward_batch import PromptChunk
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter
from tests.server.families import hf_greedy, make_family
from tests.server.fakes import Collector

ADDED = 8
BASE_VOCAB = 96  # make_family's tiny vocabulary


def prompt(first_added: int) -> list[int]:
    return [5, 9, BASE_VOCAB + first_added, 3, 30, BASE_VOCAB + 7, 7, 60]


def make_saving_adapter(base: Any, folder: Path, *, seed: int, modules: list[str], added: int = ADDED) -> Any:
    """A random PEFT adapter on q/v that also saves `modules` whole, on `base` resized by `added`
    tokens; the saved copies are moved away from the base's so they matter. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if added:
        base.resize_token_embeddings(base.get_input_embeddings().num_embeddings + added, mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=modules,
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Qwen2 base (tied embeddings: the adapter's head copy replaces the tied head); `full`: an
    adapter saving embedding and head with 8 added
    tokens; `lora`: a plain adapter. PEFT's last-token logits and greedy tokens for each."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mts")
    make_family("qwen2", root / "base", seed=5)
    out: dict[str, Any] = {"base": root / "base"}
    full = make_saving_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), root / "full", seed=50,
                               modules=["embed_tokens", "lm_head"])
    with torch.no_grad():
        out["full_logits"] = full(torch.tensor([prompt(1)])).logits[0, -1]  # [V + 8]
    out["full_tokens"] = hf_greedy(full, prompt(1), 8)
    lora = make_peft_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), root / "lora", seed=51, r=8,
                             lora_alpha=16, target_modules="all-linear")
    out["lora_tokens"] = hf_greedy(lora, prompt(0)[:2] + [40, 41], 8)
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    out["base_tokens"] = hf_greedy(base_model, [40, 41, 42], 8)
    out["full"], out["lora"] = root / "full", root / "lora"
    assert any(t >= BASE_VOCAB for t in out["full_tokens"]) or out["full_logits"][BASE_VOCAB:].abs().max() > 0
    return out


def engine_for(setup: dict[str, Any], *, module_slots: int, compile: bool = False) -> tuple[Engine, dict[str, Any]]:
    model = build_model(setup["base"], dtype=torch.float32, device="cpu", max_rows=3, max_len=64)
    model.attach_module_bank(module_slots, BASE_VOCAB + ADDED)
    bank = SlotBank(model, num_slots=2, max_rank=8, fixed_window=compile)
    weights = {name: load_weights(setup[name], bank, name) for name in ("full", "lora")}
    if compile:
        torch._dynamo.reset()
    engine = Engine(ModelRunner(model, bank, compile=compile), eos_ids=frozenset(), prefill_chunk=5,
                    slot_table=SlotTable(2), adapter_weights=weights.__getitem__)
    if compile:
        engine.runner.warm_up()
    return engine, weights


def test_logits_over_the_extended_vocabulary_equal_peft(setup: dict[str, Any]) -> None:
    engine, weights = engine_for(setup, module_slots=1)
    full = weights["full"].full
    assert full is not None and full.vocab == BASE_VOCAB + ADDED and full.embed is not None and full.head is not None
    runner = engine.runner
    assert runner.bank is not None
    runner.bank.load(0, weights["full"])
    runner.load_module_slot(0, full)
    greedy = SamplingParams(temperature=0)
    runner.reset_row(0, greedy, 0, 0, module_slot=0)
    runner.reset_row(1, greedy, 0)  # the base model, same step
    ids = prompt(1)
    logits = runner._logits([], [PromptChunk(0, ids, 0, True), PromptChunk(1, ids[:2], 0, True)])
    assert logits is not None and logits.shape == (2, BASE_VOCAB + ADDED)
    assert (logits[0] - setup["full_logits"]).abs().max().item() < 1e-4
    assert (logits[1, BASE_VOCAB:] < -1e29).all()  # the base row has no added tokens


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engine_serves_saved_modules_next_to_lora_and_base(setup: dict[str, Any], compile: bool) -> None:
    engine, _ = engine_for(setup, module_slots=1, compile=compile)
    got = Collector()
    greedy = SamplingParams(temperature=0)
    engine.submit(GenerationRequest("full", prompt(1), 8, sampling=greedy, adapter="full"), got)
    engine.submit(GenerationRequest("lora", prompt(0)[:2] + [40, 41], 8, sampling=greedy, adapter="lora"), got)
    engine.submit(GenerationRequest("base", [40, 41, 42], 8, sampling=greedy), got)
    engine.run_until_idle()
    assert got.tokens["full"] == setup["full_tokens"]
    assert got.tokens["lora"] == setup["lora_tokens"]
    assert got.tokens["base"] == setup["base_tokens"]
    if compile:
        assert engine.runner.recompilations == 0


def test_one_module_slot_serves_two_saving_adapters_in_turn(setup: dict[str, Any], tmp_path: Path) -> None:
    """With one module slot, a second adapter that saved modules waits for the first to finish,
    then evicts it; both answer as PEFT does."""
    from transformers import AutoModelForCausalLM

    other = make_saving_adapter(AutoModelForCausalLM.from_pretrained(setup["base"]), tmp_path / "other", seed=52,
                                modules=["embed_tokens", "lm_head"])
    want = hf_greedy(other, prompt(2), 8)
    engine, weights = engine_for(setup, module_slots=1)
    assert engine.runner.bank is not None
    weights["other"] = load_weights(tmp_path / "other", engine.runner.bank, "other")
    got = Collector()
    greedy = SamplingParams(temperature=0)
    engine.submit(GenerationRequest("a", prompt(1), 8, sampling=greedy, adapter="full"), got)
    engine.submit(GenerationRequest("b", prompt(2), 8, sampling=greedy, adapter="other"), got)
    engine.run_until_idle()
    assert got.tokens["a"] == setup["full_tokens"] and got.tokens["b"] == want
    assert got.order == ["a", "b"]
    assert engine.slots is not None and engine.slots.modules is not None
    assert engine.slots.modules.counters.loads == 2 and engine.slots.modules.references() == [0]


def test_an_embedding_alone_with_the_base_vocabulary(setup: dict[str, Any], tmp_path: Path) -> None:
    """A tied base: the adapter saves only embed_tokens; PEFT keeps the base head (tied to the
    original embedding), and so does loraswap."""
    from transformers import AutoModelForCausalLM

    make_family("llama-tied", tmp_path / "base", seed=6)
    peft_model = make_saving_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ad",
                                     seed=53, modules=["embed_tokens"], added=0)
    want = hf_greedy(peft_model, [5, 9, 14, 3], 8)
    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=1, max_len=32)
    model.attach_module_bank(1, BASE_VOCAB)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    weights = load_weights(tmp_path / "ad", bank)
    assert weights.full is not None and weights.full.head is None and weights.full.vocab == BASE_VOCAB
    engine = Engine(ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(1),
                    adapter_weights={"ad": weights}.__getitem__)
    got = Collector()
    engine.submit(GenerationRequest("x", [5, 9, 14, 3], 8, sampling=SamplingParams(temperature=0), adapter="ad"), got)
    engine.run_until_idle()
    assert got.tokens["x"] == want


def test_what_is_not_served_is_refused_by_name(setup: dict[str, Any], tmp_path: Path) -> None:
    import json

    model = build_model(setup["base"], dtype=torch.float32, device="cpu", max_rows=1, max_len=16)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    with pytest.raises(InvalidAdapterError, match="no module slots"):  # no module bank attached
        load_weights(setup["full"], bank)
    model.attach_module_bank(1, BASE_VOCAB + 4)
    with pytest.raises(InvalidAdapterError, match="8 added tokens; module slots hold 4"):
        load_weights(setup["full"], bank)
    folder = tmp_path / "head"
    folder.mkdir()
    config = json.loads((setup["full"] / "adapter_config.json").read_text())
    config["modules_to_save"] = ["embed_tokens", "lm_head", "score", "mlp.down_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((setup["full"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InvalidAdapterError) as info:
        load_weights(folder, bank)
    text = str(info.value)
    assert "'score' matches no module of the base model" in text
    assert "'mlp.down_proj' is not served: only the embeddings and the output head" in text


@pytest.mark.parametrize("family", ["llama-tied", "llama-mha-untied"])
def test_trainable_token_indices_equal_peft(family: str, tmp_path: Path) -> None:
    """PEFT's trainable tokens (new rows for a few token ids of the embedding, and of a tied
    head) are served as a module slot's copy of the base embedding with those rows replaced."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    make_family(family, tmp_path / "base", seed=7)
    torch.manual_seed(70)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[40, 3, 90, 5],
                        init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "ad")
    ids = [5, 9, 40, 3, 30, 90, 7]
    with torch.no_grad():
        want_logits = peft_model(torch.tensor([ids])).logits[0, -1]
    want = hf_greedy(peft_model, ids, 8)
    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=2, max_len=32)
    model.attach_module_bank(1, BASE_VOCAB)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    weights = load_weights(tmp_path / "ad", bank)
    full = weights.full
    assert full is not None and full.has_head == (family == "llama-tied")
    assert full.embed is None and full.token_rows is not None and full.token_rows.shape[0] == 4  # rows, not a copy
    engine = Engine(ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(1),
                    adapter_weights={"ad": weights}.__getitem__)
    got = Collector()
    engine.submit(GenerationRequest("x", ids, 8, sampling=SamplingParams(temperature=0), adapter="ad"), got)
    engine.run_until_idle()
    assert got.tokens["x"] == want
    runner = engine.runner
    runner.reset_row(0, SamplingParams(temperature=0), 0, 0, module_slot=0)
    logits = runner._logits([], [PromptChunk(0, ids, 0, True)])
    assert logits is not None and (logits[0] - want_logits).abs().max().item() < 1e-4
    import json

    config_path = tmp_path / "ad" / "adapter_config.json"
    broken = json.loads(config_path.read_text())
    broken["trainable_token_indices"] = [40, 40, 90, 5]
    config_path.write_text(json.dumps(broken))
    with pytest.raises(InvalidAdapterError, match="lists a token id twice"):
        load_weights(tmp_path / "ad", bank)
    broken["trainable_token_indices"] = [40, 3, 90]  # three ids, four rows saved
    config_path.write_text(json.dumps(broken))
    with pytest.raises(InvalidAdapterError, match=r"trainable_tokens_delta has shape \(4, 64\), expected \(3, 64\)"):
        load_weights(tmp_path / "ad", bank)


def test_adding_tokens_needs_both_copies_and_waiting_evicts_nothing(setup: dict[str, Any], tmp_path: Path) -> None:
    """A head saved with added tokens but no embedding is refused (the base embedding has no
    rows for them); a request that must wait for a module slot takes no LoRA slot meanwhile."""
    from safetensors.torch import load_file, save_file

    model = build_model(setup["base"], dtype=torch.float32, device="cpu", max_rows=1, max_len=16)
    model.attach_module_bank(1, BASE_VOCAB + ADDED)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    tensors = {k: v for k, v in load_file(str(setup["full"] / "adapter_model.safetensors")).items()
               if "embed_tokens" not in k}
    (tmp_path / "head").mkdir()
    save_file(tensors, str(tmp_path / "head" / "adapter_model.safetensors"))
    config = (setup["full"] / "adapter_config.json").read_text().replace('"embed_tokens", ', "")
    (tmp_path / "head" / "adapter_config.json").write_text(config)
    with pytest.raises(InvalidAdapterError, match="adds tokens but did not save embed_tokens"):
        load_weights(tmp_path / "head", bank)
    engine, _ = engine_for(setup, module_slots=1)
    assert engine.slots is not None and engine.slots.modules is not None
    engine.slots.modules.acquire("someone-else@1")  # the only module slot is busy
    loads = engine.slots.table.counters.loads
    assert engine.slots.acquire_all(["full@1"], "full@1") is None
    assert engine.slots.table.counters.loads == loads and engine.slots.table.references() == [0, 0]
