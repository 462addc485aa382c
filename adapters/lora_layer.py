"""The batched LoRA product that runs inside every targeted projection.

For each row n of a batch, on slot k = slot[n]:  y[n] += B_k @ (A_k @ x[n])  (scaling folded in B_k)

Formulation (chosen by `bench/lora_formulations.py`): dense over all slots with a one-hot mask.
One matmul shrinks x against every slot's A at once, the one-hot zeroes the columns of the slots a
row does not use, one matmul per output part expands against every slot's B. Tensors are
rank-major so the first `window` ranks of all slots form a contiguous block: when every loaded
adapter has rank <= window, only that corner is computed. Rows never mix: a row's delta depends on
its own x and slot only (the masked slots contribute exact zeros), and both products are batched
matmuls with one independent product per row, so a row's bits do not depend on how many rows
share the step (a single matmul over all rows picks its kernel by row count and does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoraBatch:
    """Per-forward LoRA routing: which slot each row uses and how many ranks to compute."""

    onehot: torch.Tensor  # [B, slots + 1] in the model dtype; the last column is the null slot
    window: int  # ranks computed per slot (a power of two <= the slot rank)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, onehot: torch.Tensor, window: int) -> torch.Tensor:
    """x # [B, S, in]; a # [R, K+1, P, in]; onehot # [B, K+1] -> masked h # [B, S, window, K+1, P]"""
    batch, seq, d_in = x.shape
    a_view = a[:window].reshape(-1, d_in)  # [window*(K+1)*P, in], contiguous corner
    h = torch.bmm(x, a_view.t().expand(batch, -1, -1))  # [B, S, window*(K+1)*P]
    h = h.view(batch, seq, window, a.shape[1], a.shape[2])
    return h * onehot[:, None, None, :, None]


def lora_expand(h: torch.Tensor, b: torch.Tensor, part: int) -> torch.Tensor:
    """h # [B, S, window, K+1, P]; b # [R, K+1, out_p] -> delta of part `part` # [B, S, out_p]"""
    batch, seq, window, slots, _ = h.shape
    rows = h[..., part].reshape(batch, seq, window * slots)  # [B, S, window*(K+1)]
    b_view = b[:window].reshape(window * slots, -1)  # [window*(K+1), out_p]
    return torch.bmm(rows, b_view.expand(batch, -1, -1))  # [B, S, out_p]


class LoraSlots(nn.Module):
    """Read-only view of one fused projection's slot tensors (the SlotBank writes them).

    `a` # [R, K+1, P, in]; `bs[p]` # [R, K+1, out_p] for each of the P projections fused in the
    module, in the order their outputs tile the module's output features.
    """

    def __init__(self, a: torch.Tensor, bs: list[torch.Tensor]) -> None:
        super().__init__()
        self.a = a
        self.bs = bs

    def add_to(self, y: torch.Tensor, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """y # [B, S, out] + every part's delta for x # [B, S, in]."""
        h = lora_shrink(x, self.a, lora.onehot, lora.window)
        deltas = [lora_expand(h, b, p) for p, b in enumerate(self.bs)]
        if len(deltas) == 1:
            return y + deltas[0]
        # Parts tile the output in order (q|k|v, gate|up), so one cat gives the full delta.
        return y + torch.cat(deltas, dim=-1)
