"""What this machine allows: memory read bandwidth, float32 matmul throughput, and the bounds they put
on the embedded SmolLM2-135M's decode throughput.

- read bandwidth: the better of `x.sum()` over a 512 MB float32 tensor and a float32
  matrix-vector product over the same 512 MB (the access pattern of a batch-1 decode step: every
  weight read once per token); both read every byte once and write nothing. Also reported:
  `y.copy_(x)` (read + write bytes / time);
- matmul: float32 `x @ w` at 2048 x 2048 x 2048 and at decode shapes (SmolLM2's fused gate/up
  projection and lm_head at batch 1 and 32), torch.set_num_threads(os.cpu_count());
- bounds for the embedded model in float32, N = all its parameters (the tied embedding counted
  once: it is read as lm_head, the row lookup of the embedding is negligible):
    batch-1 weight-streaming bound   tokens/s = read bandwidth / (4 bytes x N)
    large-batch compute bound        tokens/s = matmul FLOP/s (2048^3) / (2 x N)
  (2 FLOPs per parameter per token: one multiply-add per weight. Attention over the context adds
  4 x layers x q_dim x context FLOPs per token: about 2.5% at the ~100-token contexts of the
  workload, left out of the bound and reported separately.)
Both bounds use the best of the repetitions (an upper bound; this shared machine is noisy).

    .venv/bin/python bench/machine_limits.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import model_dir, write

NAME = "machine_limits"
BUFFER_BYTES = 512 * 2**20
MATMUL_SHAPES = [  # (name, m, k, n): x # [m, k] @ w.T # [k, n]
    ("square_2048", 2048, 2048, 2048),
    ("gate_up_b1", 1, 576, 3072),
    ("gate_up_b32", 32, 576, 3072),
    ("lm_head_b32", 32, 576, 49152),
]
CONTEXT = 100  # tokens of context for the attention-FLOPs estimate (~35-token prompt + 64 new)


def timings(fn: Callable[[], object], reps: int, warm: int = 2) -> list[float]:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def model_stats(folder: Path) -> dict[str, Any]:
    """Parameter count from the checkpoint's tensor headers (no weights read) and the config."""
    from safetensors import safe_open

    params = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                params += math.prod(f.get_slice(key).get_shape())
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_dim = cfg["num_attention_heads"] * head_dim
    return {"params": params, "layers": cfg["num_hidden_layers"], "q_dim": q_dim,
            "tied_embeddings": bool(cfg.get("tie_word_embeddings"))}


def bandwidth_rows(reps: int) -> list[dict[str, Any]]:
    numel = BUFFER_BYTES // 4
    x = torch.ones(numel, dtype=torch.float32)  # written once so every page is resident
    y = torch.empty_like(x)
    y.fill_(0.0)
    w = x.view(-1, 4096)  # [32768, 4096]: the same 512 MB as a weight matrix
    v = torch.ones(4096, dtype=torch.float32)
    rows = []
    for name, fn, moved in (
        ("sum (read)", lambda: x.sum(), BUFFER_BYTES),
        ("copy (read + write)", lambda: y.copy_(x), 2 * BUFFER_BYTES),
        ("matvec 512 MB (read)", lambda: torch.mv(w, v), w.numel() * 4),
    ):
        ts = timings(fn, reps)
        rows.append({"kind": "bandwidth", "name": name, "bytes": moved, "reps": reps,
                     "best_gb_s": round(moved / min(ts) / 1e9, 2),
                     "median_gb_s": round(moved / statistics.median(ts) / 1e9, 2)})
        print(f"bandwidth {name:22s} best {rows[-1]['best_gb_s']:7.2f} GB/s  median {rows[-1]['median_gb_s']:7.2f} GB/s",
              flush=True)
    return rows


def matmul_rows(reps: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, m, k, n in MATMUL_SHAPES:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g)
        flops = 2 * m * k * n
        # Small shapes: time a batch of calls so timer resolution does not matter.
        inner = max(1, int(2e8 // flops))

        def fn(x: torch.Tensor = x, w: torch.Tensor = w, inner: int = inner) -> None:
            for _ in range(inner):
                F.linear(x, w)

        ts = [t / inner for t in timings(fn, reps)]
        rows.append({"kind": "matmul", "name": name, "m": m, "k": k, "n": n, "reps": reps,
                     "best_gflops": round(flops / min(ts) / 1e9, 1),
                     "median_gflops": round(flops / statistics.median(ts) / 1e9, 1)})
        print(f"matmul    {name:22s} best {rows[-1]['best_gflops']:7.1f} GFLOP/s  median {rows[-1]['median_gflops']:7.1f} GFLOP/s",
              flush=True)
    return rows


def compute_bound_now() -> dict[str, float]:
    """For bench/engine_compare.py, next to its largest batch: the 2048^3 float32 matmul rate (best
    of 5) and what it implies: tokens/s = FLOP/s / (2 x params)."""
    x, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(timings(lambda: F.linear(x, w), 5))
    gflops = 2 * 2048**3 / best / 1e9
    params = model_stats(model_dir())["params"]
    return {"matmul_gflops": round(gflops, 1), "compute_bound_tokens_per_s": round(gflops * 1e9 / (2 * params), 1)}


def streaming_bound_now() -> dict[str, float]:
    """For bench/engine_compare.py, next to its batch-1 runs: the read bandwidth as main() takes it
    (the better of `x.sum()` and `torch.mv` over BUFFER_BYTES of float32, best of 5) and what it
    implies at batch 1: tokens/s = bytes/s / (4 bytes x params), every weight read once per token."""
    x = torch.ones(BUFFER_BYTES // 4)
    w, v = x.view(-1, 4096), torch.ones(4096)
    with torch.inference_mode():
        best = min(min(timings(lambda: x.sum(), 5)), min(timings(lambda: torch.mv(w, v), 5)))
    gb_s = BUFFER_BYTES / best / 1e9
    params = model_stats(model_dir())["params"]
    return {"bandwidth_gb_s": round(gb_s, 2), "streaming_bound_tokens_per_s": round(gb_s * 1e9 / (4 * params), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/machine_limits[_quick].json)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / f"{NAME}{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(os.cpu_count() or 1)
    reps = 3 if args.quick else 10
    start = time.perf_counter()
    with torch.inference_mode():
        rows = bandwidth_rows(reps) + matmul_rows(reps)
    stats = model_stats(model_dir())
    by_name = {r["name"]: r for r in rows}
    # Read bandwidth: the better of the two read-only streams (the reduction alone can fall short of
    # the memory bus on few cores; the matvec is exactly the batch-1 decode access pattern).
    source = max(("sum (read)", "matvec 512 MB (read)"), key=lambda n: by_name[n]["best_gb_s"])
    bandwidth = by_name[source]["best_gb_s"]
    gflops = by_name["square_2048"]["best_gflops"]
    weight_bytes = 4 * stats["params"]
    flops_per_token = 2 * stats["params"]
    attention_flops = 4 * stats["layers"] * stats["q_dim"] * CONTEXT
    summary = {
        "bandwidth_gb_s": bandwidth,
        "bandwidth_source": source,
        "sum_gb_s": by_name["sum (read)"]["best_gb_s"],
        "copy_gb_s": by_name["copy (read + write)"]["best_gb_s"],
        "matvec_gb_s": by_name["matvec 512 MB (read)"]["best_gb_s"],
        "matmul_gflops": gflops,
        "matmul_gflops_decode_b32": by_name["gate_up_b32"]["best_gflops"],
        "model_params": stats["params"],
        "weight_bytes_per_token": weight_bytes,
        "flops_per_token": flops_per_token,
        "attention_flops_per_token_at_context_100": attention_flops,
        "bound_tokens_per_s_batch1": round(bandwidth * 1e9 / weight_bytes, 1),
        "bound_tokens_per_s_compute": round(gflops * 1e9 / flops_per_token, 1),
        "formulas": {
            "bound_tokens_per_s_batch1": "bandwidth_gb_s * 1e9 / (4 bytes * model_params)  (float32, tied embedding read once as lm_head)",
            "bound_tokens_per_s_compute": "matmul_gflops * 1e9 / (2 * model_params)  (attention FLOPs neglected: ~2.5% at 100 tokens of context)",
        },
        "threads": torch.get_num_threads(),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "targets": [],
    }
    print(f"batch-1 weight-streaming bound {summary['bound_tokens_per_s_batch1']} tok/s "
          f"({weight_bytes / 1e6:.0f} MB of weights per token at {bandwidth} GB/s); "
          f"compute bound {summary['bound_tokens_per_s_compute']} tok/s "
          f"({flops_per_token / 1e6:.0f} MFLOP per token at {gflops} GFLOP/s)", flush=True)
    write(out, NAME, rows, summary, quick=args.quick)


if __name__ == "__main__":
    main()
