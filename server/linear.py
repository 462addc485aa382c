"""Linear layers with an optional oneDNN-packed weight for float32 on CPU.

PyTorch's default CPU matmul (MKL sgemm) reaches well under this CPU's float32 peak at the
decode shapes (M = 8..32 rows, K = hidden size); a weight reordered once into oneDNN's blocked
layout runs them 1.1-4.6x faster (`bench/linear_kernels.py`; small projections at M = 1 are
slower, but the large ones, which dominate, are faster there too). Packing is
a load-time step: the dense weight is then dropped (kept only as a shape on the meta device), so
memory does not double. Tied weights stay dense because the embedding reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch, LoraSlots


def onednn_packing_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Linear):
    """nn.Linear plus an optional packed weight and optional LoRA slots (attached by the SlotBank)."""

    packed: torch.Tensor | None
    lora: LoraSlots | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.packed = None
        self.lora = None

    def pack(self, *, batch_hint: int, keep_dense: bool = False) -> None:
        """Reorder the weight for oneDNN (float32, CPU). `batch_hint`: typical rows per call."""
        weight = self.weight.detach()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        if not keep_dense:
            self.weight = nn.Parameter(weight.to("meta"), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if lora is not None and self.lora is not None:
            y = self.lora.add_to(y, x, lora)
        return y
