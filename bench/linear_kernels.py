"""Which float32 CPU matmul the model's projections use: MKL (F.linear) vs oneDNN-packed weights.

Measures the SmolLM2-135M projection shapes at decode batch sizes 1, 8 and 32 and reports each
kernel's throughput and its ratio to F.linear measured in the same run (absolute numbers on these
shared machines are noisy; ratios are what to compare). Writes bench/results/linear_kernels.json.

    .venv/bin/python bench/linear_kernels.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import seconds_per_call, write_results

# (name, in_features, out_features) for SmolLM2-135M: fused qkv, o, fused gate_up, down, lm_head.
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]
BATCHES = [1, 8, 32]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, k, n in SHAPES:
        weight = torch.randn(n, k)
        for m in BATCHES:
            x = torch.randn(m, k)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)
            flops = 2 * m * k * n
            mkl = seconds_per_call(lambda: F.linear(x, weight))
            onednn = seconds_per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            rows.append({
                "shape": name, "m": m, "k": k, "n": n,
                "mkl_gflops": round(flops / mkl / 1e9, 1),
                "onednn_gflops": round(flops / onednn / 1e9, 1),
                "onednn_speedup": round(mkl / onednn, 2),
            })
            print(f"{name:8s} m={m:3d}  F.linear {rows[-1]['mkl_gflops']:6.1f} GFLOP/s  "
                  f"oneDNN {rows[-1]['onednn_gflops']:6.1f} GFLOP/s  x{rows[-1]['onednn_speedup']}")
    write_results("linear_kernels", rows)


if __name__ == "__main__":
    main()
