"""Which batched LoRA formulation the slot bank uses, decided by measurement.

For one projection (SmolLM2's fused gate_up: 576 -> 3072, and o_proj: 576 -> 576) and K=8 slots of
rank R, every row n of a batch adds `B[slot[n]] @ (A[slot[n]] @ x[n])`. Candidates:

- gather:  index the slot tensors per row (A[slot] [N, R, in], B[slot] [N, out, R]) and bmm;
- dense:   one matmul against all slots' A stacked ([K*R, in]), zero the other slots' columns
           with a one-hot mask, one matmul against all B stacked ([out, K*R]);
- grouped: a Python loop over the distinct slots in the batch, rows of one slot together;
- dense_window: `dense` on rank-major slot tensors (A [R, K, in], B [R, K, out]) sliced to the
           first 16 ranks, as when every active adapter has rank <= 16 in rank-64 slots.

Each is timed against the base projection itself (oneDNN-packed, as the model runs it) in the
same run; the overhead ratio `lora / base` is what to compare. Rows of a batch are spread over
min(N, 8) adapters. Writes bench/results/lora_formulations.json.

    .venv/bin/python bench/lora_formulations.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import seconds_per_call, write_results

K = 8
SHAPES = [("gate_up", 576, 3072), ("o_proj", 576, 576)]
BATCHES = [1, 8, 32]
RANKS = [16, 64]


def gather(x, a, b, slots):  # type: ignore[no-untyped-def]
    # x [N, in]; a [K+1, R, in]; b [K+1, out, R]; slots [N]
    h = torch.bmm(a[slots], x[:, :, None])  # [N, R, 1]
    return torch.bmm(b[slots], h)[:, :, 0]  # [N, out]


def dense(x, a_flat, b_flat, onehot, rank):  # type: ignore[no-untyped-def]
    # a_flat [(K+1)*R, in]; b_flat [out, (K+1)*R]; onehot [N, K+1]
    h = F.linear(x, a_flat).view(x.shape[0], -1, rank) * onehot[:, :, None]  # [N, K+1, R]
    return F.linear(h.view(x.shape[0], -1), b_flat)  # [N, out]


def dense_window(x, a_rank_major, b_rank_major, onehot, window):  # type: ignore[no-untyped-def]
    # a_rank_major [R, K+1, in], b_rank_major [R, K+1, out]: the [:window] corner is contiguous
    a_view = a_rank_major[:window].reshape(-1, x.shape[1])  # [window*(K+1), in]
    h = F.linear(x, a_view).view(x.shape[0], window, -1) * onehot[:, None, :]  # [N, window, K+1]
    return h.view(x.shape[0], -1) @ b_rank_major[:window].reshape(-1, b_rank_major.shape[-1])


def grouped(x, a, b, slots):  # type: ignore[no-untyped-def]
    out = torch.zeros(x.shape[0], b.shape[1])
    for slot in slots.unique().tolist():
        rows = (slots == slot).nonzero()[:, 0]
        out.index_add_(0, rows, F.linear(F.linear(x[rows], a[slot]), b[slot]))
    return out


def main() -> None:
    torch.manual_seed(0)
    results = []
    for name, d_in, d_out in SHAPES:
        weight = torch.randn(d_out, d_in)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        for rank in RANKS:
            a = torch.randn(K + 1, rank, d_in) * 0.01
            b = torch.randn(K + 1, d_out, rank) * 0.01
            a_flat = a.reshape(-1, d_in).contiguous()
            b_flat = b.permute(1, 0, 2).reshape(d_out, -1).contiguous()
            a_rm = a.permute(1, 0, 2).contiguous()  # [R, K+1, in]
            b_rm = b.permute(2, 0, 1).contiguous()  # [R, K+1, out]
            for n in BATCHES:
                x = torch.randn(n, d_in)
                slots = torch.arange(n) % min(n, K)
                onehot = F.one_hot(slots, K + 1).float()
                ref = gather(x, a, b, slots)
                assert torch.allclose(dense(x, a_flat, b_flat, onehot, rank), ref, atol=1e-4)
                assert torch.allclose(grouped(x, a, b, slots), ref, atol=1e-4)
                if rank == 16:
                    assert torch.allclose(dense_window(x, a_rm, b_rm, onehot, 16), ref, atol=1e-4)
                base = seconds_per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 0.25)
                row = {"module": name, "rank": rank, "batch": n, "base_us": round(base * 1e6, 1)}
                with torch.inference_mode():
                    for label, fn in (
                        ("gather", lambda: gather(x, a, b, slots)),
                        ("dense", lambda: dense(x, a_flat, b_flat, onehot, rank)),
                        ("grouped", lambda: grouped(x, a, b, slots)),
                        ("dense_window16", lambda: dense_window(x, a_rm, b_rm, onehot, 16)),
                    ):
                        row[f"{label}_over_base"] = round(seconds_per_call(fn, 0.25) / base, 3)
                results.append(row)
                print(row)
    write_results("lora_formulations", results, slots=K)


if __name__ == "__main__":
    main()
