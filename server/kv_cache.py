"""Preallocated key/value cache indexed by sequence row.

Every layer owns two buffers `[max_rows, kv_heads, max_len, head_dim]`. A row is one sequence;
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
        shape = (max_rows, kv_heads, max_len, head_dim)
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


def write_and_view(
    cache: torch.Tensor,
    new: torch.Tensor,
    *,
    row_start: int,
    rows: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """Write `new` # [B, kv_heads, S, head_dim] at `rows` # [B, 1] (= row_start + arange(B)) and
    `positions` # [B, S]; return the attended window of those rows as a view
    # [B, kv_heads, kv_len, head_dim]."""
    # Advanced indices around a slice put their dims first: target is [B, S, kv_heads, head_dim].
    cache[rows, :, positions] = new.transpose(1, 2)
    return cache[row_start : row_start + new.shape[0], :, :kv_len]
