"""What the slot bank needs from the model it attaches to, as protocols.

`server.model.Transformer` satisfies them; `adapters/` names the shapes it relies on instead of
importing the server's model, so the adapter layer sits below the server and never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch


class TargetModule(Protocol):
    """A (possibly fused) projection that LoRA slots attach to (`server.linear.Linear`)."""

    in_features: int
    lora: Any  # the module's LoraSlots once a bank is attached

    @property
    def device(self) -> torch.device: ...

    def weight_norms_sq(self) -> torch.Tensor:
        """||W_i||^2 of every output row of the base weight # [out] (DoRA)."""
        ...

    def weight_product(self, a: torch.Tensor) -> torch.Tensor:
        """a # [r, in] -> a W^T # [r, out] with the base weight as the layer computes with it (DoRA)."""
        ...


class TargetPart(Protocol):
    """One Hugging Face projection inside a target module: the module and its output slice."""

    @property
    def module(self) -> TargetModule: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


class LoraHost(Protocol):
    """A model LoRA slots can attach to."""

    @property
    def compute_dtype(self) -> torch.dtype: ...

    @property
    def max_rows(self) -> int:
        """Cache rows (decoding sequences) the model was allocated for; 0 before allocation."""
        ...

    def linear_parts(self) -> Mapping[str, TargetPart]: ...

    def hf_module_names(self) -> set[str]: ...
