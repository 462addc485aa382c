"""DoRA adapters and mixed-adapter requests against plain LoRA, in one loraswap server and one run.

The shared workload (bench/common.py): the embedded SmolLM2-135M-Instruct in float32, chat
requests at once (request i: `messages(i)`), greedy, EOS ignored, NEW_TOKENS tokens each, through
the official AsyncOpenAI client (bench/openai_load.py). Adapters: the random rank-16 all-linear
adapters ad0..ad7 of the other benchmarks (.bench-cache/adapters) and DoRA versions dora0..dora3 of
ad0..ad3 (the same A and B plus magnitudes m = ||W + B A|| * (1 + 0.1 noise), so that DoRA's
factor s is near 1 and the text stays text-like). One server, `--max-loras 12`, all twelve
registered and warmed up, so no point loads an adapter while it is timed:

  base:        every request to the base model;
  lora_8:      request i to ad{i % 8}: 8 plain LoRA adapters mixed in the batch (the baseline);
  dora_half_8: request i to dora{i % 4} or ad{4 + i % 4}: 8 adapters of which half are DoRA;
  mix2:        request i to `ad{i % 8}:0.5+ad{(i + 1) % 8}:0.5`: every request mixes two adapters.

Ratios are of tokens/s against lora_8 (and against base) within this run.

    .venv/bin/python bench/adapter_features.py --quick   # 16 requests of 16 tokens; ~1.5 min
    .venv/bin/python bench/adapter_features.py           # 32 requests of 64 tokens; ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import NEW_TOKENS, QUICK_NEW_TOKENS, make_adapters, model_dir, write  # noqa: E402
from openai_load import run_load  # noqa: E402
from servers import free_port, serve  # noqa: E402

CACHE = ROOT / ".bench-cache"
LOGS = CACHE / "logs"
BASE = "base"
REQUESTS, QUICK_REQUESTS = 32, 16
ADAPTERS, DORA = 8, 4
LORASWAP = ROOT / ".venv" / "bin" / "loraswap"


def make_dora(plain: Path, folder: Path, base: Path, seed: int) -> Path:
    """A DoRA copy of the PEFT adapter `plain`: its A and B, magnitudes near ||W + s B A||."""
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    config = json.loads((plain / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        w = weights[module.removeprefix("base_model.model.") + ".weight"].float()  # [out, in]
        merged = w + scaling * tensors[f"{module}.lora_B.weight"].float() @ tensors[key].float()
        norm = merged.norm(dim=1)  # [out]
        out[f"{module}.lora_magnitude_vector"] = norm * (1 + 0.1 * torch.randn(norm.shape, generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return folder


def points(requests: int) -> dict[str, list[str]]:
    return {
        "base": [BASE] * requests,
        "lora_8": [f"ad{i % ADAPTERS}" for i in range(requests)],
        "dora_half_8": [f"dora{i % DORA}" if i % 2 == 0 else f"ad{DORA + i % DORA}" for i in range(requests)],
        "mix2": [f"ad{i % ADAPTERS}:0.5+ad{(i + 1) % ADAPTERS}:0.5" for i in range(requests)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_REQUESTS} requests of {QUICK_NEW_TOKENS} tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_features.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    requests = QUICK_REQUESTS if args.quick else REQUESTS
    base = model_dir()
    adapters = make_adapters(CACHE / "adapters", ADAPTERS)
    adapters |= {f"dora{i}": make_dora(adapters[f"ad{i}"], CACHE / "dora_adapters" / f"dora{i}", base, 2000 + i)
                 for i in range(DORA)}
    flags = ["--max-num-seqs", str(REQUESTS), "--max-model-len", "256", "--max-loras", str(len(adapters)),
             "--max-lora-rank", "16"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="adapter_features_") as tmp:
        port = free_port()
        cmd = [str(LORASWAP), "serve", "--port", str(port), "--served-model-name", BASE, *flags, "--data-dir",
               str(Path(tmp) / "data"), "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        with serve("adapter_features", cmd, port, "/ready", LOGS / "adapter_features.log", env=dict(os.environ),
                   timeout=300.0) as srv:
            run_load(srv["url"], [BASE, *adapters], 4)  # every adapter into its slot before timing
            for point, models in points(requests).items():
                r = run_load(srv["url"], models, tokens)
                if not r["exact"]:
                    raise RuntimeError(f"{point}: requests did not all return {tokens} tokens: {r['tokens']}")
                row = {"system": "loraswap", "point": point, **{k: v for k, v in r.items() if k != "tokens"}}
                rows.append(row)
                print(f"  {point:12s} {row['tok_s']:8.2f} tok/s  wall {row['wall_s']:.1f} s", flush=True)
    tok_s = {r["point"]: r["tok_s"] for r in rows}
    for r in rows:
        r["vs_lora_8"] = round(r["tok_s"] / tok_s["lora_8"], 3)
        r["vs_base"] = round(r["tok_s"] / tok_s["base"], 3)
    summary = {"tok_s": tok_s, "vs_lora_8": {r["point"]: r["vs_lora_8"] for r in rows},
               "vs_base": {r["point"]: r["vs_base"] for r in rows}, "total_s": round(time.perf_counter() - t0, 1)}
    write(args.out, "adapter_features", rows, summary, quick=args.quick, requests=requests, new_tokens=tokens,
          flags=" ".join(flags), loadavg_end=os.getloadavg())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
