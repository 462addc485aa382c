"""What the side-by-side benchmarks (`make bench`) share: the workload and the adapters.

Every comparison uses the embedded SmolLM2-135M-Instruct in float32, the same chat prompts, the
same number of generated tokens with EOS ignored, and greedy decoding. Adapters are random
rank-16 LoRA adapters on all linear layers, saved in the files PEFT writes, so that every system
(loraswap, transformers + PEFT, vLLM) loads the very same ones.

Each bench script takes `--quick` and `--out FILE` and writes one JSON object:
    {"name": ..., "quick": bool, "rows": [...], "summary": {...}}
`bench/run_all.py` runs them one after another and merges the files.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any

import torch

# Every linear projection of a Llama-family block (make_adapters' targets).
from tests.adapters.helpers import ALL_LINEAR

RANK = 16
NEW_TOKENS = 64
QUICK_NEW_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?", "Explain why the sky is blue.", "Write a haiku about autumn.",
    "List three prime numbers.", "How do airplanes stay in the air?", "Give me a tip for learning Python.",
    "What does a LoRA adapter change in a model?", "Describe a cat in one sentence.",
    "Why do leaves change colour?", "What is a black hole?", "Name a famous painter.", "How does a bicycle work?",
    "What is photosynthesis?", "Suggest a name for a dog.", "What is the boiling point of water?",
    "Translate 'thank you' into Spanish.", "What is 12 times 12?", "Who wrote Romeo and Juliet?",
    "What causes rain?", "Describe the ocean in five words.", "What is a prime number?", "How do magnets work?",
    "What is the tallest mountain?", "Give a synonym for happy.", "Why is exercise healthy?",
    "What is an atom?", "How many legs does a spider have?", "What is the speed of light?",
    "Recommend a book for children.", "What is a volcano?", "How do you make tea?", "What is gravity?",
]


def messages(i: int) -> list[dict[str, str]]:
    """The i-th chat request of the workload (32 distinct questions, then they repeat)."""
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def chat_prompts(tok: Any, batch: int) -> list[list[int]]:
    """Prompt ids of the first `batch` workload requests as the server encodes chat requests
    (server/service.py encode_chat)."""
    out = []
    for i in range(batch):
        text = tok.apply_chat_template(messages(i), tokenize=False, add_generation_prompt=True)
        out.append(list(tok.encode(text, add_special_tokens=False)))
    return out


def model_dir() -> Path:
    """The embedded model as a Hugging Face folder (converted once into the cache)."""
    from server.model_source import resolve_model

    return resolve_model(None)


def make_adapters(root: Path, count: int, *, base: Path | None = None, rank: int = RANK) -> dict[str, Path]:
    """`count` random PEFT adapters ad0..ad{count-1} under root (reused when already there)."""
    from tests.adapters.helpers import write_random_adapter

    base = base or model_dir()
    out = {}
    for i in range(count):
        folder = root / f"ad{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            # Small B keeps generations text-like; the work per token does not depend on values.
            write_random_adapter(folder, base, rank=rank, targets=ALL_LINEAR, seed=1000 + i, scale=0.02)
        out[f"ad{i}"] = folder
    return out


def header() -> dict[str, Any]:
    return {"date": date.today().isoformat(), "host": platform.node(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def write(out: Path, name: str, rows: list[dict[str, Any]], summary: dict[str, Any], *, quick: bool,
          **extra: Any) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"name": name, "quick": quick, **header(), **extra, "rows": rows, "summary": summary},
                              indent=2) + "\n")
    print(f"wrote {out}", flush=True)
