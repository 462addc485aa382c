"""Resident memory under adapter churn: upload, load into a slot, unload and delete small adapters
1,000 times through the admin API (in process, the embedded SmolLM2-135M), and compare resident
memory after the first 10 cycles with after all of them. Growth should stay within a few percent.
Writes bench/results/adapter_churn.json.

    .venv/bin/python bench/adapter_churn.py [--cycles 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from harness import write_results
from safetensors.torch import save_file

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service

RANK = 4
LAYERS, HIDDEN = 30, 576  # SmolLM2-135M; q_proj and v_proj (v: 3 kv heads x 64)


def adapter_files(seed: int) -> dict[str, tuple[str, bytes]]:
    """A small random rank-4 adapter on q_proj and v_proj, as the two files of a multipart form."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for target, d_out in (("q_proj", HIDDEN), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.01
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/w.safetensors")
        weights = Path(f"{tmp}/w.safetensors").read_bytes()
    config = json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    return {"adapter_config.json": ("adapter_config.json", config.encode()),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights)}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    forms = [adapter_files(seed) for seed in range(8)]  # reused: each upload is still a full cycle
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(max_num_seqs=4, max_model_len=256, max_loras=4, max_lora_rank=8, data_dir=Path(data))
        app = create_app(lambda: build_service(settings))
        with TestClient(app, client=("127.0.0.1", 40000)) as client:
            while client.get("/ready").status_code != 200:
                time.sleep(0.2)
            marks: dict[int, float] = {}
            start = time.perf_counter()
            for cycle in range(1, args.cycles + 1):
                name = f"churn{cycle % 16}"
                for method, path, kwargs in (
                    ("PUT", f"/admin/adapters/{name}", {"files": forms[cycle % len(forms)]}),
                    ("POST", f"/admin/adapters/{name}/load", {}),
                    ("POST", f"/admin/adapters/{name}/unload", {}),
                    ("DELETE", f"/admin/adapters/{name}", {}),
                ):
                    response = client.request(method, path, **kwargs)
                    if response.status_code != 200:
                        raise RuntimeError(f"cycle {cycle}: {method} {path}: {response.text}")
                if cycle in (10, 100, args.cycles) or cycle % 250 == 0:
                    gc.collect()
                    marks[cycle] = rss_mb()
                    print(f"cycle {cycle:5d}: rss {marks[cycle]:.1f} MB", flush=True)
            elapsed = time.perf_counter() - start
    growth = marks[args.cycles] / marks[10] - 1
    print(f"growth from cycle 10 to {args.cycles}: {growth * 100:+.2f}% ({elapsed / args.cycles * 1000:.1f} ms/cycle)")
    rows = [{"cycle": c, "rss_mb": round(m, 1)} for c, m in sorted(marks.items())]
    write_results("adapter_churn", rows, cycles=args.cycles, growth_vs_cycle_10=round(growth, 4),
                  ms_per_cycle=round(elapsed / args.cycles * 1000, 1), target_growth="< 0.02")


if __name__ == "__main__":
    main()
