"""Decode attention per layer call: today's dense cache views vs the paged kernel vs its fallback.

SmolLM2-135M's attention shape (9 heads, 3 kv heads, head_dim 64), every row attending L
positions. (a) dense: keys/values as a contiguous view [n, kv_heads, L, hd] of a per-row cache,
as server.model.decode_attention does today; (b) the C++ op reading a block pool (block_size 16,
blocks shuffled); (c) the pure-PyTorch fallback on the same pool. Microseconds per call, best of
3 repeats of 100 calls. Writes bench/results/paged_attention.json.

    .venv/bin/python bench/paged_attention.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]

from harness import write_results

from server.paged_attention import (
    paged_decode_attention,
    paged_decode_reference,
    paged_kernel_backend,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
CASES = [(16, 128), (32, 128), (32, 256), (32, 512), (1, 1024)]


def best_us(fns: list[Callable[[], object]], calls: int = 100, repeats: int = 3) -> list[float]:
    """Best microseconds per call of each fn; the fns take turns so machine noise hits all alike."""
    for fn in fns:
        for _ in range(5):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    return best


def dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n, heads, hd = q.shape
    qg = q.view(n, KV_HEADS, heads // KV_HEADS, hd)  # [n, kvh, g, hd]
    scores = (qg @ keys.transpose(-1, -2)) * hd**-0.5  # [n, kvh, g, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ values).reshape(n, heads, hd)


def measure(n: int, L: int) -> dict[str, Any]:
    q = torch.randn(n, HEADS, HEAD_DIM)
    cache_k = torch.randn(n + 1, KV_HEADS, L, HEAD_DIM)  # per-row cache (last row: scratch)
    cache_v = torch.randn(n + 1, KV_HEADS, L, HEAD_DIM)
    keys, values = cache_k[:n], cache_v[:n]  # contiguous views [n, kvh, L, hd]
    mask = torch.ones(n, 1, 1, L, dtype=torch.bool)
    per_row = L // BLOCK
    num_blocks = n * per_row + 8
    k_pool = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM)  # [num_slots, kvh, hd]
    v_pool = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
    tables = torch.randperm(num_blocks)[: n * per_row].view(n, per_row)  # shuffled blocks
    lengths = torch.full((n,), L, dtype=torch.long)
    a, b, c = best_us([
        lambda: dense(q, keys, values, mask),
        lambda: paged_decode_attention(q, k_pool, v_pool, tables, lengths, block_size=BLOCK),
        lambda: paged_decode_reference(q, k_pool, v_pool, tables, lengths, block_size=BLOCK),
    ])
    print(f"n={n:3d} L={L:5d}  dense {a:8.1f} us  cpp {b:8.1f} us ({b / a:.2f}x)  "
          f"torch fallback {c:8.1f} us ({c / a:.2f}x)")
    return {"n": n, "L": L, "dense_us": round(a, 1), "cpp_us": round(b, 1), "torch_us": round(c, 1),
            "cpp_over_dense": round(b / a, 2), "torch_over_dense": round(c / a, 2)}


def main() -> None:
    backend = paged_kernel_backend()
    if backend != "cpp":
        print("warning: the C++ kernel is unavailable; the cpp column measures the fallback too")
    torch.manual_seed(0)
    rows = [measure(n, L) for n, L in CASES]
    write_results("paged_attention", rows, backend=backend, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  shape={"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK})


if __name__ == "__main__":
    main()
