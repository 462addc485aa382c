"""Structured-output throughput as a ratio to unconstrained decoding, in one engine and one run.

The engine in process (no HTTP: both points pay the same for it), on the embedded
SmolLM2-135M-Instruct in float32, `ROWS` chat requests at once (bench/common.py's questions, each
asking for a JSON answer), sampled at temperature 0.7 with fixed seeds:

  json_schema: every request constrained by SCHEMA (compiled once, cached): token masks from
               xgrammar, computed on a worker thread while the forward runs;
  free:        the same requests with no format, each held to exactly the number of tokens its
               constrained twin produced (EOS ignored): the same batch shapes, step for step.

Reported: tokens/s of both and their ratio; the seconds the grammar masks took to compute and the
seconds the steps waited for them after the forward (the part of the mask work that is on the
step's path); every constrained output validated against SCHEMA.

    .venv/bin/python bench/structured_outputs.py --quick   # 8 requests; ~1 min
    .venv/bin/python bench/structured_outputs.py           # 32 requests; ~3 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import QUESTIONS, model_dir, write  # noqa: E402

ROWS, QUICK_ROWS = 32, 8
MAX_TOKENS = 200  # more than SCHEMA can take (80 + 3 x 24 characters and its syntax): every output completes
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 80},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["answer", "confidence", "topics"],
}


def prompt_ids(tok: Any, i: int) -> list[int]:
    question = QUESTIONS[i % len(QUESTIONS)]
    messages = [{"role": "user", "content": f"{question} Answer in JSON with answer, confidence and topics."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def run(engine: Any, requests: list[Any]) -> tuple[dict[str, list[int]], float]:
    from tests.server.fakes import Collector

    got = Collector()
    start = time.perf_counter()
    for request in requests:
        engine.submit(request, got)
    engine.run_until_idle()
    return got.tokens, time.perf_counter() - start


def main() -> int:
    import jsonschema
    from transformers import AutoTokenizer

    from server.engine import Engine
    from server.runner import ModelRunner
    from server.sampling import SamplingParams
    from server.sequence import GenerationRequest
    from server.structured import StructuredOutputs, parse_spec
    from server.weights import build_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} requests")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "structured_outputs.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = QUICK_ROWS if args.quick else ROWS
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=rows, max_len=512)
    eos = frozenset({tok.eos_token_id})
    engine = Engine(ModelRunner(model), eos_ids=eos, max_num_batched_tokens=2048)
    spec = parse_spec(None, {"json": SCHEMA}, {})
    assert spec is not None
    compile_start = time.perf_counter()
    grammar = asyncio.run(StructuredOutputs(tok, model.cfg.vocab_size).compile(spec))
    compile_s = time.perf_counter() - compile_start
    prompts = [prompt_ids(tok, i) for i in range(rows)]

    def constrained(tag: str) -> list[Any]:
        return [GenerationRequest(f"{tag}{i}", p, MAX_TOKENS, SamplingParams(temperature=0.7, seed=i, grammar=grammar))
                for i, p in enumerate(prompts)]

    run(engine, constrained("warm"))  # first-use costs (allocations, the grammar's caches) out of the timing
    sampler = engine.runner.sampler
    sampler.mask_s = sampler.mask_wait_s = 0.0
    outputs, json_s = run(engine, constrained("json"))
    texts = [tok.decode(outputs[f"json{i}"], skip_special_tokens=True) for i in range(rows)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    lengths = [len(outputs[f"json{i}"]) for i in range(rows)]
    mask_s, wait_s = sampler.mask_s, sampler.mask_wait_s
    free = [GenerationRequest(f"free{i}", p, n, SamplingParams(temperature=0.7, seed=i), ignore_eos=True)
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    free_out, free_s = run(engine, free)
    assert [len(free_out[f"free{i}"]) for i in range(rows)] == lengths
    tokens = sum(lengths)
    table = [
        {"point": "free", "requests": rows, "completion_tokens": tokens, "wall_s": round(free_s, 3),
         "tok_s": round(tokens / free_s, 2)},
        {"point": "json_schema", "requests": rows, "completion_tokens": tokens, "wall_s": round(json_s, 3),
         "tok_s": round(tokens / json_s, 2), "mask_s": round(mask_s, 3), "mask_wait_s": round(wait_s, 3),
         "all_valid": True},
    ]
    summary = {"vs_free": round(free_s / json_s, 3), "mask_share_of_wall": round(mask_s / json_s, 4),
               "mask_wait_share_of_wall": round(wait_s / json_s, 4), "compile_s": round(compile_s, 3),
               "mean_tokens": round(tokens / rows, 1), "example": texts[0][:200],
               "total_s": round(time.perf_counter() - t0, 1)}
    for row in table:
        print(f"  {row['point']:12s} {row['tok_s']:8.2f} tok/s  wall {row['wall_s']:.2f} s", flush=True)
    write(args.out, "structured_outputs", table, summary, quick=args.quick, requests=rows, max_tokens=MAX_TOKENS,
          loadavg_end=os.getloadavg())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
