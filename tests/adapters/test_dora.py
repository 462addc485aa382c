"""DoRA adapters (`use_dora: true`) against PEFT's DoRA model: alone and in one batch with plain
LoRA adapters and the base model, on q/k/v/o and all-linear, on a base with q/k/v biases (Qwen2:
the bias is not rescaled), packed and unpacked weights, eager and compiled (no recompilation).
The magnitudes are perturbed after PEFT initialises them (PEFT starts them at ||W + B A||, where
DoRA equals LoRA), so the tests see DoRA's own term."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.errors import InvalidAdapterError
from adapters.slot_bank import SlotBank
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, mixed_batch_logits, slot_engine, unwrap
from tests.server.families import hf_greedy, make_family
from tests.server.fakes import Collector

PROMPT = [5, 9, 14, 3, 30, 31, 7, 7, 60, 61, 62]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_dora_adapter(base: Any, folder: Path, *, seed: int, **lora_kwargs: Any) -> Any:
    """A random PEFT DoRA adapter on `base` (an HF model) with magnitudes moved away from their
    initial ||W + B A||; saved to `folder`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, use_dora=True, **lora_kwargs)).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand_like(param))
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[torch.Tensor], list[Any]]:
    """A Qwen2 base, two DoRA adapters (q/k/v/o; all-linear) and one plain LoRA adapter, with
    PEFT's logits for PROMPT under each and under the base; and PEFT models for generation."""
    root = tmp_path_factory.mktemp("dora")
    hf = make_family("qwen2", root / "base", seed=3)
    ids = torch.tensor([PROMPT])
    folders, logits, models = [], [], []
    specs = [(True, {"r": 8, "lora_alpha": 16, "target_modules": QKVO}),
             (True, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
             (False, {"r": 8, "lora_alpha": 32, "target_modules": "all-linear"})]
    base_logits = None
    for i, (dora, spec) in enumerate(specs):
        folder = root / f"a{i}"
        make = make_dora_adapter if dora else make_peft_adapter
        peft_model = make(hf, folder, seed=30 + i, **spec)
        with torch.no_grad():
            logits.append(peft_model(ids).logits[0])
            if base_logits is None:
                with peft_model.disable_adapter():
                    base_logits = peft_model(ids).logits[0]
        models.append(hf_greedy(peft_model, PROMPT, 8))
        folders.append(folder)
        hf = unwrap(peft_model)
    assert base_logits is not None
    logits.append(base_logits)
    models.append(hf_greedy(hf, PROMPT, 8))
    return root / "base", folders, logits, models


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "dense"])
def test_dora_and_lora_rows_in_one_batch_equal_peft(setup: Any, pack: bool) -> None:
    base, folders, expected, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=4, max_len=32, pack=pack)
    bank = SlotBank(model, num_slots=3, max_rank=8)
    weights = [load_weights(folder, bank, f"a{i}") for i, folder in enumerate(folders)]
    assert [w.uses_dora for w in weights] == [True, True, False]
    for slot, w in enumerate(weights):
        bank.load(slot, w)
    got = mixed_batch_logits(model, bank, torch.tensor([PROMPT]), [0, 1, 2, bank.null_slot])  # [rows, S, V]
    for row, want in enumerate(expected):
        assert (got[row] - want).abs().max().item() < 1e-4, f"row {row}"
    # DoRA's own term matters here: the same adapter without its magnitudes is another model.
    plain = load_weights(folders[0], bank, "plain")
    assert (expected[0] - expected[3]).abs().max() > 1e-3
    bank.load(0, type(plain)(name="p", config=plain.config,
                             modules={k: type(m)(a=m.a, b=m.b, scaling=m.scaling) for k, m in plain.modules.items()}))
    undone = mixed_batch_logits(model, bank, torch.tensor([PROMPT]), [0])
    assert (undone[0] - expected[0]).abs().max() > 1e-3


def test_a_slot_forgets_dora_when_plain_lora_replaces_it(setup: Any) -> None:
    base, folders, expected, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=1, max_len=32)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    for i in (0, 1, 2):
        bank.load(0, load_weights(folders[i], bank, f"a{i}"))
    got = mixed_batch_logits(model, bank, torch.tensor([PROMPT]), [0])
    assert (got[0] - expected[2]).abs().max().item() < 1e-4
    bank.clear(0)
    got = mixed_batch_logits(model, bank, torch.tensor([PROMPT]), [0])
    assert (got[0] - expected[3]).abs().max().item() < 1e-4


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engine_serves_dora_lora_and_base_together(setup: Any, compile: bool) -> None:
    """Greedy tokens of the three adapters and the base model, served at once, equal PEFT's
    generate; under compile the warm graphs serve DoRA without recompiling."""
    base, folders, _, wants = setup
    engine, _ = slot_engine(base, folders, slots=3, rows=4, compile=compile)
    got = Collector()
    for i, adapter in enumerate(["a0", "a1", "a2", None]):
        engine.submit(GenerationRequest(str(i), PROMPT, max_tokens=8, sampling=SamplingParams(temperature=0),
                                        adapter=adapter), got)
    engine.run_until_idle()
    if compile:
        assert engine.runner.recompilations == 0
    for i, want in enumerate(wants):
        assert got.tokens[str(i)] == want, f"request {i}"
    assert len({tuple(w) for w in wants}) == 4


def test_scaled_or_mixed_dora_is_refused_by_the_bank(setup: Any) -> None:
    base, folders, _, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=2, max_len=32)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    bank.load(0, load_weights(folders[0], bank, "a0"))
    bank.load(1, load_weights(folders[2], bank, "a2"))
    with pytest.raises(ValueError, match="DoRA"):
        bank.route([((0, 0.5),)], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="DoRA"):
        bank.route([((0, 1.0), (1, 1.0))], device=torch.device("cpu"))
    assert bank.route([((1, 0.5),), ((0, 1.0),)], device=torch.device("cpu")) is not None


def test_broken_magnitudes_are_refused_with_every_problem(setup: Any, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    base, folders, _, _ = setup
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=1, max_len=8)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    tensors = load_file(str(folders[0] / "adapter_model.safetensors"))
    keys = sorted(k for k in tensors if k.endswith("lora_magnitude_vector"))
    assert keys and all(tensors[k].dim() == 1 for k in keys)
    tensors[keys[0]] = tensors[keys[0]][:-1]  # wrong shape
    tensors[keys[1]][3] = float("nan")
    del tensors[keys[2]]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((folders[0] / "adapter_config.json").read_text())
    with pytest.raises(InvalidAdapterError) as info:
        load_weights(bad, bank)
    text = str(info.value)
    for phrase in ("lora_magnitude_vector has shape", "lora_magnitude_vector contains NaN",
                   "use_dora is true but its lora_magnitude_vector is missing"):
        assert phrase in text, text
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    config["use_dora"] = False  # magnitudes in a plain LoRA adapter: a mislabeled file
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(load_file(str(folders[0] / "adapter_model.safetensors")), str(bad / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapterError, match="use_dora is false"):
        load_weights(bad, bank)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_dora_on_a_quantized_base_matches_peft(method: str, tmp_path: Path) -> None:
    """The norm of a quantized base is taken on its dequantized weight, as PEFT does."""
    from tests.server.test_quantization import assert_within_quantization_error, quantized_logits

    hf = make_family("qwen2", tmp_path / "base", hidden_size=128, intermediate_size=256)
    make_dora_adapter(hf, tmp_path / "ad", seed=6, r=8, lora_alpha=16, target_modules="all-linear")
    logits = quantized_logits(tmp_path / "base", tmp_path / "ad", method)
    assert (logits[3] - logits[1]).abs().max() > 1e-2  # the adapter really matters
    assert_within_quantization_error(method, *logits, floor=1e-4)
