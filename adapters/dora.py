"""DoRA at inference: a constant per adapter and output channel.

PEFT's DoRA computes y = s * (W x + B A x) + bias with s = m / ||W + B A|| (the row norm over
input features, B carrying the LoRA scaling). The norm does not depend on the input, so it is
computed once, when the adapter is validated, and `s` is stored next to the slot's A and B
(adapters/slot_bank.py). The base weight is read as the model computes with it: the norm is
expanded as ||W||^2 + 2 (B A).W + ||B A||^2, whose pieces are the base weight's row norms (kept
by the layer) and A W^T (the layer applied to A's rows), so a packed or quantized weight never
has to be rebuilt in full.
"""

from __future__ import annotations

import torch


def weight_update_norms(weight_sq: torch.Tensor, products: torch.Tensor, a: torch.Tensor,
                        slot_b: torch.Tensor) -> torch.Tensor:
    """||W_i + (B A)_i|| for every output channel i, in float64 # [out].
    weight_sq # [out] = ||W_i||^2; products # [r, out] = A W^T; a # [r, in]; slot_b # [r, out] = (s B)^T"""
    b = slot_b.double()  # [r, out]
    cross = (b * products.double()).sum(0)  # [out]: (B A)_i . W_i = sum_r B[i, r] (A W^T)[r, i]
    gram = a.double() @ a.double().t()  # [r, r]
    update_sq = ((gram @ b) * b).sum(0)  # [out]: ||(B A)_i||^2 = B_i (A A^T) B_i^T
    return (weight_sq.double() + 2 * cross + update_sq).clamp(min=0).sqrt()


def dora_factor(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """s = m / ||W + B A|| # [out] float32 (norms from weight_update_norms)."""
    return (magnitude.double() / norms).float()
