"""Preallocated key/value cache indexed by sequence row.

Every layer owns two buffers `[max_rows + 1, kv_heads, max_len, head_dim]` (the last row is
scratch space for padding tokens). A row is one sequence;
each token is written at its own (row, position), so decoding rows of different lengths needs no
padding, no reallocation and no change of shape. Rows are handed out by the engine; a new
sequence overwrites positions from 0 and attends only to positions it wrote. Under a device map
each layer's buffers live on that layer's device.

Masked positions get zero attention weight, but 0 x NaN is NaN: a value left by an earlier
sequence that overflowed would reach the next sequence on that row through the weighted sum.
So a freed row's written positions are zeroed (`clear_row`): cost proportional to what the
sequence wrote, paid once when it ends.
"""

from __future__ import annotations

import torch


class KVCache(torch.nn.Module):
    def __init__(
        self,
        *,
        num_layers: int,
        max_rows: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
    ) -> None:
        """`layer_devices`: where each layer's buffers go (its weights' device)."""
        super().__init__()
        if len(layer_devices) != num_layers:
            raise ValueError(f"{len(layer_devices)} layer devices for {num_layers} layers")
        self.max_rows = max_rows
        self.max_len = max_len
        self.scratch_row = max_rows  # one extra row: where padding tokens write, read by nobody
        shape = (max_rows + 1, kv_heads, max_len, head_dim)
        # Buffers (not a list of tensors) so .to(device) moves them and compile sees fixed addresses.
        for i, dev in enumerate(layer_devices):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def clear_row(self, row: int, upto: int) -> None:
        """Zero positions [0, upto) of `row` in every layer."""
        upto = min(max(upto, 1), self.max_len)
        for buffer in self.buffers():
            buffer[row, :, :upto].zero_()


def write_tokens(cache: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
    """Write `new` # [T, kv_heads, head_dim] at (`rows`, `positions`) # each [T]."""
    # Advanced indices around a slice put their dim first: the target is [T, kv_heads, head_dim].
    cache[rows, :, positions] = new
