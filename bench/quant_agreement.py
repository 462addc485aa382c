"""How closely the quantized embedded model follows float32: greedy top-1 agreement.

For each prompt, float32 greedy-generates `NEW_TOKENS` tokens; then every model (float32, int8,
nf4, fp4) reads that same sequence (teacher forcing) and we count the positions of the generated
part where its argmax equals float32's. Also reports the decoder projections' memory against
float32 and the decode speed of one prefill + generation (CPU bitsandbytes is slow). Writes
bench/results/quant_agreement.json.

    .venv/bin/python bench/quant_agreement.py
"""

from __future__ import annotations

import time

import torch
from harness import write_results
from transformers import AutoTokenizer

from server.model import Transformer
from server.model_source import resolve_model
from server.weights import build_model

NEW_TOKENS = 24
PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "Write a haiku about the sea.",
    "List three primary colours.", "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
    "What is 12 times 12?", "Name a famous painting by Leonardo da Vinci.", "Why do we have seasons?",
    "Give one tip for better sleep.", "What is the boiling point of water in Celsius?", "Who wrote Hamlet?",
]


def logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor([ids])
    hidden = model(tokens, torch.arange(len(ids))[None], row_start=0, kv_len=len(ids))
    return model.logits(hidden)[0]  # [S, V]


def greedy(model: Transformer, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(logits(model, ids)[-1].argmax()))
    return ids


def main() -> None:
    folder = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True)["input_ids"]
               for p in PROMPTS]
    reference = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=256)
    with torch.inference_mode():
        sequences = [greedy(reference, p) for p in prompts]
        want = [logits(reference, s)[len(p) - 1 : -1].argmax(-1) for p, s in zip(prompts, sequences)]
        dense_bytes = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=16,
                                  pack=False).memory_footprint()["linear_bytes"]
        rows = []
        for method in ["none", "int8", "nf4", "fp4"]:
            model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=1, max_len=256,
                                quantization=None if method == "none" else method)
            start = time.perf_counter()
            got = [logits(model, s)[len(p) - 1 : -1].argmax(-1) for p, s in zip(prompts, sequences)]
            seconds = time.perf_counter() - start
            agree = sum(int((g == w).sum()) for g, w in zip(got, want))
            total = sum(len(w) for w in want)
            first_answer = tokenizer.decode(greedy(model, prompts[0])[len(prompts[0]):], skip_special_tokens=True)
            rows.append({
                "quantization": method, "top1_agreement": round(agree / total, 4), "positions": total,
                "linear_bytes": model.memory_footprint()["linear_bytes"],
                "linear_vs_float32": round(model.memory_footprint()["linear_bytes"] / dense_bytes, 3),
                "teacher_forced_s": round(seconds, 2), "answer_0": first_answer,
            })
            print(rows[-1], flush=True)
    write_results("quant_agreement", rows, new_tokens=NEW_TOKENS, prompts=len(PROMPTS))


if __name__ == "__main__":
    main()
