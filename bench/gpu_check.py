"""The GPU check (run by bench/gpu_check.sh on a machine with an NVIDIA GPU; under 10 minutes).

No model can be downloaded there, so it builds a random Llama-family checkpoint (about 0.5B
parameters) and random rank-16 adapters, then measures on CUDA:
1. bfloat16 logits against transformers on the same checkpoint;
2. int8 and nf4 (bitsandbytes on CUDA): logits against transformers' bitsandbytes model, and the
   decoder projections' memory against bfloat16;
3. `--compile`: warm-up graphs and time, recompilations over 100 hotswaps under decode;
4. decode throughput at 1, 8, 32 and 64 rows, without adapters and with 8 adapters, eager and
   compiled, as ratios to eager without adapters;
5. `--device-map`: a GPU + CPU split against the GPU alone, and the `auto` plan.
Writes one JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.peft_format import read_adapter_dir
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import validate
from server.engine import Engine
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.adapters.helpers import ALL_LINEAR, write_random_adapter

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)


def make_checkpoint(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)


def reference_logits(folder: Path, ids: torch.Tensor, quant: str | None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = None
    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    elif quant is not None:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", quantization_config=config)
    with torch.inference_mode():
        out = model(ids.cuda()).logits.float()
    del model
    torch.cuda.empty_cache()
    return out


def native_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(ids.cuda(), torch.arange(ids.shape[1], device="cuda")[None], row_start=0, kv_len=ids.shape[1])
        return model.logits(hidden).float()


def parity(folder: Path) -> list[dict[str, Any]]:
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0))
    dense_bytes = None
    rows = []
    for quant in (None, "int8", "nf4"):
        model = build_model(folder, dtype=torch.bfloat16, device="cuda", max_rows=1, max_len=128, quantization=quant)
        got = native_logits(model, ids)
        want = reference_logits(folder, ids, quant)
        linear = model.memory_footprint()["linear_bytes"]
        dense_bytes = dense_bytes or linear
        rows.append({"quantization": quant or "bfloat16", "max_abs_diff": (got - want).abs().max().item(),
                     "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                     "linear_vs_bf16": linear / dense_bytes})
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def device_map_check(folder: Path, adapter: Path) -> dict[str, Any]:
    """A real two-device split (first half of the layers on the GPU, the rest with the norm and
    the head on the CPU; float32) against the same model on the GPU alone, base and with an
    adapter in a slot; and what `--device-map auto` plans on this machine."""
    from server.device_map import estimate_part_sizes, resolve_device_map
    from server.model_config import load_model_config
    from server.placement import Placement

    cfg = load_model_config(folder)
    half = cfg.num_hidden_layers // 2
    split = Placement("cuda:0", ("cuda:0",) * half + ("cpu",) * (cfg.num_hidden_layers - half), "cpu", "cpu")
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    logits = {}
    null = -1  # bank.null_slot, recorded below (the same on both sides: same num_slots)
    for name, placement in (("gpu", None), ("split", split)):
        model = build_model(folder, dtype=torch.float32, device="cuda", max_rows=1, max_len=64, placement=placement)
        bank = SlotBank(model, num_slots=2, max_rank=16)
        bank.load(0, validate(read_adapter_dir(adapter, "a"), bank.spec(), "a"))
        null = bank.null_slot
        with torch.inference_mode():
            for slot in (0, bank.null_slot):
                lora = bank.batch(torch.tensor([slot], device="cuda"))
                hidden = model(ids.cuda(), torch.arange(48, device="cuda")[None], row_start=0, kv_len=48, lora=lora)
                logits[(name, slot)] = model.logits(hidden).float().cpu()
        devices = sorted({str(t.device) for t in bank.buffers()})
        del model, bank
        torch.cuda.empty_cache()
    sizes = estimate_part_sizes(cfg, dtype_bytes=2, quantization=None, quantize_lm_head=False, kv_blocks=2048,
                                block_size=16, num_slots=8, max_rank=16)
    auto = resolve_device_map("auto", cfg, lambda: sizes)
    out = {
        "split": split.to_json(), "split_boundaries": split.boundaries(), "split_slot_devices": devices,
        "max_abs_diff_base": (logits[("split", null)] - logits[("gpu", null)]).abs().max().item(),
        "max_abs_diff_adapter": (logits[("split", 0)] - logits[("gpu", 0)]).abs().max().item(),
        "auto": auto.to_json(),
    }
    print(out, flush=True)
    return out


def engine_for(folder: Path, adapters: list[Path], *, compile: bool, rows: int) -> tuple[Engine, dict[str, Any]]:
    model = build_model(folder, dtype=torch.bfloat16, device="cuda", max_rows=rows, max_len=512)
    bank = SlotBank(model, num_slots=8, max_rank=16, fixed_window=compile)
    store = {f"ad{i}": validate(read_adapter_dir(p, f"ad{i}"), bank.spec(), f"ad{i}") for i, p in enumerate(adapters)}
    engine = Engine(ModelRunner(model, bank, compile=compile), eos_ids=frozenset(), slot_table=SlotTable(8),
                    adapter_weights=store.__getitem__, max_waiting=4096)
    return engine, store


def decode_rate(engine: Engine, rows: int, adapters: int, tokens: int = 64) -> float:
    for i in range(rows):
        engine.submit(GenerationRequest(f"r{i}", list(range(5, 37)), max_tokens=tokens, ignore_eos=True,
                                        sampling=SamplingParams(temperature=0),
                                        adapter=f"ad{i % adapters}" if adapters else None), lambda e: None)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.run_until_idle()
    torch.cuda.synchronize()
    return rows * tokens / (time.perf_counter() - start)


def throughput_and_compile(folder: Path, adapters: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": []}
    for compile in (False, True):
        torch._dynamo.reset()
        engine, store = engine_for(folder, adapters, compile=compile, rows=64)
        start = time.perf_counter()
        engine.runner.warm_up()
        if compile:
            out["compile"] = {"warm_up_s": time.perf_counter() - start, "graphs": engine.runner.warm_graphs}
        decode_rate(engine, 4, 0, tokens=8)  # allocator warm-up
        for batch in (1, 8, 32, 64):
            for n_adapters in (0, 8):
                rate = decode_rate(engine, batch, n_adapters)
                out["rows"].append({"compile": compile, "batch": batch, "adapters": n_adapters, "tokens_per_s": rate})
                print(out["rows"][-1], flush=True)
        if compile:  # 100 hotswaps into slot 0 between decode steps: no recompilation
            names = list(store)
            for i in range(100):
                engine.runner.load_slot(0, store[names[i % len(names)]])
                decode_rate(engine, 2, 1, tokens=2)
            out["compile"]["recompilations_after_100_swaps"] = engine.runner.recompilations
        del engine
        torch.cuda.empty_cache()
    base = {(r["compile"], r["batch"]): r["tokens_per_s"] for r in out["rows"] if r["adapters"] == 0 and not r["compile"]}
    for r in out["rows"]:
        r["vs_eager_base"] = r["tokens_per_s"] / base[(False, r["batch"])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
                               "config": CONFIG}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_checkpoint(folder)
        adapters = [write_random_adapter(Path(tmp) / f"ad{i}", folder, rank=16, targets=ALL_LINEAR, seed=i, scale=0.01)
                    for i in range(8)]
        results["parity"] = parity(folder)
        results["device_map"] = device_map_check(folder, adapters[0])
        results.update(throughput_and_compile(folder, adapters))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
