"""Preallocated, block-paged key/value cache.

Every layer owns two pools `[num_blocks + 2, block_size, kv_heads, head_dim]`. A sequence's
positions live in the blocks its block table lists (server/kv_blocks.py hands them out): position
p is slot `table[p // block_size] * block_size + p % block_size` of the pool seen flat as
`[slots, kv_heads, head_dim]`. Blocks are fixed-size, so a sequence takes memory as it grows and
gives it back when it ends, and the pool's shape never changes (a compiled model keeps its graphs).

Two blocks past the real ones are reserved: `scratch_block`, where padding tokens of a
fixed-shape decode write (read by nobody), and `zero_block`, never written, which a gathered
window reads for positions past a sequence's end. A block handed to a new sequence may still
hold an earlier sequence's numbers (NaN included); readers never touch positions the sequence
has not written (the decode kernel stops at each row's length, gathered prompt windows read the
zero block there), so nothing is cleared when a sequence ends.
"""

from __future__ import annotations

import torch


class KVCache(torch.nn.Module):
    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
    ) -> None:
        """`layer_devices`: where each layer's pools go (its weights' device)."""
        super().__init__()
        if len(layer_devices) != num_layers:
            raise ValueError(f"{len(layer_devices)} layer devices for {num_layers} layers")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.zero_block = num_blocks + 1
        shape = (num_blocks + 2, block_size, kv_heads, head_dim)
        # Buffers (not a list of tensors) so .to(device) moves them and compile sees fixed addresses.
        for i, dev in enumerate(layer_devices):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's pools, flat: # [slots, kv_heads, head_dim] each (views)."""
        k, v = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        return k.flatten(0, 1), v.flatten(0, 1)


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold `positions` positions."""
    return -(-positions // block_size)


def kv_bytes_per_token(*, num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Memory one cached position takes over all layers (keys and values)."""
    return 2 * num_layers * kv_heads * head_dim * dtype_bytes


def pool_blocks(budget_bytes: int, *, bytes_per_token: int, block_size: int, max_rows: int, max_len: int) -> int:
    """Blocks a KV budget holds, but never more than `max_rows` sequences of `max_len` need (what
    the engine can ever hold at once)."""
    cap = max_rows * blocks_for(max_len, block_size)
    return min(cap, budget_bytes // (bytes_per_token * block_size))


def write_tokens(pool: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """Write `new` # [T, kv_heads, head_dim] into the flat `pool` at `slots` # [T]."""
    pool.index_copy_(0, slots, new)
