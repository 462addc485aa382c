"""Rotary position embedding: inverse frequencies (linear, Llama 3, YaRN and LongRoPE scaling),
cos/sin tables, and the rotation itself (of the whole head or of its first `rotary_dim` features).

The tables are computed once for every position up to the configured bound; the model gathers
rows of them by position, so rope costs one index per step and no trigonometry.
"""

from __future__ import annotations

import math

import torch

from server.model_config import RopeConfig


def inverse_frequencies(dim: int, rope: RopeConfig, max_len: int) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies # [dim // 2] float32 for `dim` rotated features, and the
    factor cos and sin are multiplied by (YaRN and LongRoPE; 1 otherwise). `max_len`: the longest
    sequence served (LongRoPE picks its factor set by it)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [dim // 2]
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3_scale(inv_freq, rope), 1.0
    if rope.type == "yarn":
        return _yarn(dim, rope)
    if rope.type == "longrope":
        return _longrope(exponents, rope, max_len)
    return inv_freq, 1.0


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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp linearly between
    the dimensions that turn `beta_fast` and `beta_slow` times over the original context."""
    base, factor, original = rope.theta, rope.factor, rope.original_max_position_embeddings
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = _yarn_mscale(factor)

    def turning_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = turning_dim(rope.beta_fast), turning_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim // 2]
    powers = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated, interpolated = 1.0 / powers, 1.0 / (factor * powers)
    keep = 1 - ramp  # 1: the frequency is kept as trained
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _longrope(exponents: torch.Tensor, rope: RopeConfig, max_len: int) -> tuple[torch.Tensor, float]:
    """LongRoPE: each frequency divided by its own factor; the long set when the server's longest
    sequence exceeds the original context (one choice per server, so cached keys stay valid)."""
    original = rope.original_max_position_embeddings
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.factor <= 1.0:
        attention = 1.0
    else:
        attention = math.sqrt(1 + math.log(rope.factor) / math.log(original))
    factors = rope.long_factor if max_len > original else rope.short_factor
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**exponents)
    return inv_freq, float(attention)


def rope_tables(dim: int, rope: RopeConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, in the rotate-half layout, scaled by the attention factor.
    # each [max_len, dim]"""
    inv_freq, attention = inverse_frequencies(dim, rope, max_len)  # [dim // 2]
    positions = torch.arange(max_len, dtype=torch.float32)  # [max_len]
    freqs = positions[:, None] * inv_freq[None, :]  # [max_len, dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, dim]
    if attention == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention, emb.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x # [T, heads, head_dim] by cos/sin
    # [T, 1, rot]; the rest pass through (partial rotary embeddings)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
