"""The transformers-backed path (server/hf_model.py) on architectures without a native spec:
logits and greedy tokens equal transformers', PEFT adapters equal PEFT's in mixed batches, a
native family gives the native path's tokens, and what neither path serves is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from config.settings import Settings
from server.engine import Engine
from server.errors import UnsupportedModelError
from server.hf_model import load_transformers_model
from server.model_impl import check_options, model_architecture
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import load_weights, mixed_batch_logits, peft_references
from tests.server.families import COMMON, TRANSFORMERS_FAMILIES, hf_greedy, make_family
from tests.server.fakes import Collector

FAMILIES = sorted(TRANSFORMERS_FAMILIES)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [40, 41, 40, 42, 40, 43, 44]]


def load(folder: Path, rows: int = 4):  # type: ignore[no-untyped-def]
    model = load_transformers_model(folder, dtype=torch.float32, device="cpu")
    model.allocate(max_rows=rows, max_len=64)
    return model


def generate(engine: Engine, prompts: list[list[int]], adapters: list[str | None] | None = None) -> dict[str, list[int]]:
    got = Collector()
    for i, prompt in enumerate(prompts):
        adapter = None if adapters is None else adapters[i]
        engine.submit(GenerationRequest(str(i), prompt, max_tokens=10, sampling=SamplingParams(temperature=0),
                                        adapter=adapter), got)
    engine.run_until_idle()
    return got.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers(family: str, tmp_path: Path) -> None:
    reference = make_family(family, tmp_path, seed=3)
    assert model_architecture("auto", tmp_path)[0] == "transformers"  # no native spec: auto falls back
    model = load(tmp_path)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    got = model.logits(model(ids, torch.arange(24)[None], row_start=2, kv_len=24))
    assert (got - expected).abs().max().item() < 1e-4
    # The engine: prompts over several chunks, rows of different lengths decoding together.
    engine = Engine(ModelRunner(model), eos_ids=frozenset(), prefill_chunk=5)
    tokens = generate(engine, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[str(i)] == hf_greedy(reference, prompt, 10), f"row {i} of {family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_equals_peft(family: str, tmp_path: Path) -> None:
    """Two PEFT adapters (all-linear, GPT-NeoX's fused query_key_value included) and the base
    model in one batch: each row equals PEFT's logits for its adapter, prefill and decode."""
    base = make_family(family, tmp_path / "base", seed=1)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    specs = [dict(r=rank, lora_alpha=2 * rank, target_modules="all-linear") for rank in (8, 4)]
    expected = peft_references(base, tmp_path, ids, specs)  # adapter 0, adapter 1, base
    model = load(tmp_path / "base", rows=3)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    for slot in range(2):
        bank.load(slot, load_weights(tmp_path / f"a{slot}", bank, f"a{slot}"))
    got = mixed_batch_logits(model, bank, ids, [0, 1, bank.null_slot])  # [3, S, V]
    for row in range(3):
        assert (got[row] - expected[row]).abs().max().item() < 1e-4, f"row {row} of {family}"


def test_a_native_family_through_transformers_gives_the_native_tokens(tmp_path: Path) -> None:
    """Qwen3 both ways, with adapters mixed in the batch: the same greedy tokens."""
    from tests.server.test_adapter_scheduling import random_adapters

    make_family("qwen3", tmp_path, seed=5)
    outputs = []
    for model in (build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=4, max_len=64), load(tmp_path)):
        bank = SlotBank(model, num_slots=2, max_rank=8)
        store = random_adapters(bank, 2)
        from adapters.slot_table import SlotTable

        engine = Engine(ModelRunner(model, bank), eos_ids=frozenset(), prefill_chunk=5, slot_table=SlotTable(2),
                        adapter_weights=store.__getitem__)
        outputs.append(generate(engine, [*PROMPTS, PROMPTS[0]], ["ad0", None, "ad1", None]))
    assert outputs[0] == outputs[1]
    assert outputs[0]["0"] != outputs[0]["3"]  # the adapter changes the tokens: the LoRA path is not inert


def write_config(folder: Path, **raw: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_what_neither_path_serves_is_refused_with_both_reasons(tmp_path: Path) -> None:
    bert = write_config(tmp_path / "bert", model_type="bert", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96)
    with pytest.raises(UnsupportedModelError, match=r"cannot be served\. native: .*no native spec.*transformers"):
        model_architecture("auto", bert)
    t5 = write_config(tmp_path / "t5", model_type="t5", vocab_size=96, d_model=64, num_layers=2, num_heads=4)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        model_architecture("auto", t5)
    with pytest.raises(UnsupportedModelError, match="no native spec"):
        model_architecture("native", write_config(tmp_path / "neox", model_type="gpt_neox", **COMMON))


def test_an_encoder_is_refused_at_load(tmp_path: Path) -> None:
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=96, is_decoder=False)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        load(tmp_path)


def test_options_the_transformers_path_lacks_are_refused() -> None:
    check_options("native", Settings(quantization="nf4", compile=True))
    with pytest.raises(UnsupportedModelError, match="--quantization, --compile need a native model spec"):
        check_options("transformers", Settings(quantization="nf4", compile=True))
    with pytest.raises(UnsupportedModelError, match="--max-module-slots need a native model spec"):
        check_options("transformers", Settings(max_module_slots=1))


def test_attention_extras_it_does_not_compute_are_refused_at_load(tmp_path: Path) -> None:
    """GPT-OSS passes attention sinks (`s_aux`) to its attention: refused, not ignored."""
    import transformers

    config = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                       num_experts_per_tok=1, max_position_embeddings=256, sliding_window=8)
    transformers.GptOssForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="passes s_aux to its attention"):
        load(tmp_path)


def test_batch_dependent_rope_and_unknown_heads_are_refused(tmp_path: Path) -> None:
    """Dynamic and LongRoPE scaling in transformers follow the longest sequence of the batch; a
    head scale the path does not know could be a divisor or a multiplier."""
    dynamic = make_family("gpt-neox", tmp_path / "dynamic", rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    del dynamic
    with pytest.raises(UnsupportedModelError, match="dynamic rope scaling.*longest sequence"):
        model_architecture("transformers", tmp_path / "dynamic")
    make_family("phi3-longrope", tmp_path / "longrope")
    with pytest.raises(UnsupportedModelError, match="longrope rope scaling"):
        model_architecture("transformers", tmp_path / "longrope")
    make_family("gpt-neox", tmp_path / "scaled", logit_scale=2.0)
    with pytest.raises(UnsupportedModelError, match="sets logit_scale"):
        load(tmp_path / "scaled")


def test_a_spec_that_refuses_a_config_is_final_under_auto(tmp_path: Path) -> None:
    """A Llama with dynamic rope scaling: the native spec refuses it, and auto does not hand it
    to the transformers-backed path, which would compute it batch-dependently."""
    folder = write_config(tmp_path / "llama", model_type="llama", **COMMON,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="'dynamic' is not supported"):
        model_architecture("auto", folder)


def test_sliding_windows_come_from_what_the_layers_compute(tmp_path: Path) -> None:
    """Mistral's config has a window but no layer_types: the probe records each layer's window,
    and the prompt masks and decode follow it (a 24-token test past a window of 8)."""
    reference = make_family("mistral-window", tmp_path, seed=4)
    model = load(tmp_path)
    assert model.cfg.layer_windows == (8, 8)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference(ids).logits
    got = model.logits(model(ids, torch.arange(24)[None], row_start=1, kv_len=24))
    assert (got - expected).abs().max().item() < 1e-4
    tokens = generate(Engine(ModelRunner(model), eos_ids=frozenset(), prefill_chunk=5), [list(range(5, 25))])
    assert tokens["0"] == hf_greedy(reference, list(range(5, 25)), 10)
