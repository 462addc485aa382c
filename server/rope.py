"""Rotary position embedding: inverse frequencies (with llama3 / linear scaling) and cos/sin tables.

The tables are computed once for every position up to the configured bound; the model gathers
rows of them by position, so rope costs one index per step and no trigonometry.
"""

from __future__ import annotations

import math

import torch

from server.model_config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, float32. # [head_dim // 2]"""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_tables(head_dim: int, rope: RopeConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, in the rotate-half layout. # each [max_len, head_dim]"""
    inv_freq = inverse_frequencies(head_dim, rope)  # [head_dim // 2]
    positions = torch.arange(max_len, dtype=torch.float32)  # [max_len]
    freqs = positions[:, None] * inv_freq[None, :]  # [max_len, head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x # [B, heads, S, head_dim] by cos/sin # [B, 1, S, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
