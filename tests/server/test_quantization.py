"""bitsandbytes int8 / nf4 / fp4 base models: logits against transformers on the same quantized
base, adapters against PEFT on it, and the memory footprint of the decoder projections.

On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights and computes in bfloat16 (and
crashes on input sizes that are not a multiple of 64); loraswap turns that off
(server/linear.py keep_compute_dtype). The tests force bitsandbytes' host detection either way
(`force_avx512bf16`), so both kinds of host are tested on any host."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import bitsandbytes  # noqa: F401  (a dev dependency: a broken install fails here, it never skips)
import pytest
import torch

from adapters.slot_bank import SlotBank
from server.linear import keep_compute_dtype
from server.weights import build_model
from tests.adapters.helpers import ALL_LINEAR, load_weights, native_logits, write_random_adapter
from tests.server.families import make_family


METHODS = ["int8", "nf4", "fp4"]
HOSTS = ["avx2", "avx512bf16"]


def force_avx512bf16(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """Make bitsandbytes' Linear4bit believe it runs on an AVX512-BF16 CPU, or on one without."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: host == "avx512bf16")


def reference(folder: Path, method: str, adapter: Path | None = None) -> Any:
    """transformers (+ PEFT) on the same base, quantized by transformers' bitsandbytes integration,
    computing in float32 as asked (bnb_4bit_compute_dtype) on every CPU: bitsandbytes' own bfloat16
    path for AVX512-BF16 hosts is turned off in it as in loraswap."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=False,
                                    bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    for module in model.modules():
        keep_compute_dtype(module)
    return model.eval()


def unquantized(folder: Path, adapter: Path | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("quant") / "base"
    make_family("llama-tied", folder, hidden_size=128, intermediate_size=256)
    return folder


def assert_within_quantization_error(
    method: str, got_base: torch.Tensor, want_base: torch.Tensor, got_lora: torch.Tensor, want_lora: torch.Tensor,
    exact_lora: torch.Tensor, *, floor: float,
) -> None:
    """loraswap's logits within a fraction of the quantization's own error of the reference's."""
    quantization_error = float((want_lora - exact_lora).abs().max())
    assert quantization_error > floor, quantization_error  # quantized for real
    tight = 0.002 * quantization_error
    lora_atol = 0.1 * quantization_error if method == "int8" else tight
    assert torch.allclose(got_base, want_base, atol=tight, rtol=0), ((got_base - want_base).abs().max(), tight)
    assert torch.allclose(got_lora, want_lora, atol=lora_atol, rtol=0), ((got_lora - want_lora).abs().max(), lora_atol)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_base_and_adapter_match_peft(
    base: Path, method: str, host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_avx512bf16(monkeypatch, host)
    adapter = write_random_adapter(tmp_path / "ad", base, rank=8, targets=ALL_LINEAR, seed=3, scale=1.0)
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=2, max_len=64, quantization=method)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    bank.load(1, load_weights(adapter, bank))
    ids = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want_base = reference(base, method)(ids).logits
        want_lora = reference(base, method, adapter)(ids).logits
        exact_lora = unquantized(base, adapter)(ids).logits
        got_base = native_logits(model, bank, ids, bank.null_slot)
        got_lora = native_logits(model, bank, ids, 1)
    assert (want_lora - want_base).abs().max() > 1e-2  # the adapter really matters
    # The tolerance is a fraction of the quantization's own error on these logits (how far the
    # quantization moves them), not a number read off one host. The base model is the same
    # float32 computation on both sides (summation order aside). With an adapter, LLM.int8()
    # rounds each activation row to int8, so a 1e-7 difference in how the LoRA delta was summed
    # can move a value across one rounding step downstream: a tenth of the error there.
    assert_within_quantization_error(method, got_base, want_base, got_lora, want_lora, exact_lora, floor=1e-3)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_computes_in_float32_on_avx512bf16_hosts_too(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input sizes that are not a multiple of 64 (this model's down_proj takes 96) crash
    bitsandbytes' AVX512-BF16 repacking; loraswap never repacks, so both hosts give the same
    float32 logits, and no weight is left in the repacked layout."""
    import bitsandbytes as bnb

    folder = tmp_path / "odd"
    make_family("llama-tied", folder)  # intermediate_size 96
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = {}
    for host in HOSTS:
        force_avx512bf16(monkeypatch, host)
        model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=2, max_len=32, quantization=method)
        with torch.inference_mode():
            hidden = model(ids, torch.arange(9).expand(2, 9), row_start=0, kv_len=9)
            logits[host] = model.logits(hidden)
        states = [m.quantized.weight.quant_state for m in model.modules() if getattr(m, "quantized", None) is not None]
        assert states and not any(getattr(st, "packing_format_for_cpu", False) for st in states), host
        assert all(st.absmax.dtype == torch.float32 for st in states), host
    assert torch.equal(logits["avx2"], logits["avx512bf16"])
    # The forcing reaches bitsandbytes' decision: a Linear4bit of its own does repack.
    plain = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type=method)
    plain.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type=method, module=plain)
    plain = plain.to("cpu").eval()
    assert plain.support_avx512bf16_for_cpu
    with torch.inference_mode(), contextlib.suppress(Exception):  # no bf16 kernel on a CPU without it
        plain(torch.randn(1, 128))
    assert plain.weight.quant_state.packing_format_for_cpu


def test_memory_of_the_projections(base: Path) -> None:
    dense = build_model(base, dtype=torch.float32, device="cpu", max_rows=1, max_len=16, pack=False).memory_footprint()
    for method, bound in (("int8", 0.6), ("nf4", 0.4), ("fp4", 0.4)):
        quant = build_model(base, dtype=torch.float32, device="cpu", max_rows=1, max_len=16, quantization=method)
        footprint = quant.memory_footprint()
        assert footprint["linear_bytes"] < bound * dense["linear_bytes"], method
        # The embedding (tied lm_head) stays float32; the packed lm_head copy is counted too.
        packed_head = quant.lm_head.weight_bytes() if quant.lm_head.packed is not None else 0
        assert footprint["other_weight_bytes"] == dense["other_weight_bytes"] + packed_head, method


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_lm_head_matches_transformers(method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path / "untied"
    make_family("llama-mha-untied", folder, hidden_size=128, intermediate_size=256)
    skip: list[str] = []  # transformers keeps lm_head unquantized unless told to skip nothing
    config = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip) if method == "int8"
              else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=False,
                                      bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip))
    want_model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=torch.float32)
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=32, quantization=method,
                        quantize_lm_head=True)
    plain = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=32, quantization=method)
    assert model.lm_head.quantized is not None
    assert model.memory_footprint()["other_weight_bytes"] < plain.memory_footprint()["other_weight_bytes"]
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = want_model(ids).logits
        hidden = model(ids, torch.arange(12)[None], row_start=0, kv_len=12)
        got = model.logits(hidden)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_quantized_lm_head_refuses_a_tied_head(base: Path) -> None:
    from server.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="untied"):
        build_model(base, dtype=torch.float32, device="cpu", max_rows=1, max_len=16, quantization="nf4", quantize_lm_head=True)


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["gemma3", "phi3", "olmo2"])
def test_other_families_quantize_like_transformers(family: str, method: str, tmp_path: Path) -> None:
    """Quantization reads the projection layout from the spec: Gemma 3 (sandwich norms, QK-norm),
    Phi-3 (fused checkpoint projections and the adapters on them), OLMo 2 (post-norms)."""
    from tests.adapters.helpers import make_peft_adapter

    hf = make_family(family, tmp_path / "base", hidden_size=128, intermediate_size=256)
    make_peft_adapter(hf, tmp_path / "ad", seed=4, r=8, lora_alpha=16, target_modules="all-linear")
    assert_within_quantization_error(method, *quantized_logits(tmp_path / "base", tmp_path / "ad", method), floor=1e-4)


def quantized_logits(base: Path, adapter: Path, method: str) -> tuple[torch.Tensor, ...]:
    """(loraswap base, reference base, loraswap adapter, reference adapter, unquantized adapter)
    logits on a fixed prompt, the base quantized by `method`: assert_within_quantization_error's
    arguments."""
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=2, max_len=64, quantization=method)
    bank = SlotBank(model, num_slots=1, max_rank=8)
    bank.load(0, load_weights(adapter, bank))
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want_base = reference(base, method)(ids).logits
        want_lora = reference(base, method, adapter)(ids).logits
        exact_lora = unquantized(base, adapter)(ids).logits
        got_base = native_logits(model, bank, ids, bank.null_slot)
        got_lora = native_logits(model, bank, ids, 0)
    return got_base, want_base, got_lora, want_lora, exact_lora
