"""One decoder layer of the native model, built from a family-neutral ModelConfig.

What differs between families is read from the config: norm placement (pre / sandwich / post)
and offset, QK-norm, activation, attention scale and soft-capping, the layer's sliding window
and which rope table it uses, the residual multiplier. Module names follow Hugging Face so
checkpoint and adapter keys address them; q/k/v and gate/up are fused (`qkv_proj`,
`gate_up_proj`; server/model_config.py `layer_projections`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.forward_batch import ForwardBatch
from server.kv_cache import write_tokens
from server.linear import Linear
from server.model_config import NORM_ROLES, ModelConfig
from server.paged_attention import paged_decode_attention
from server.rope import apply_rope

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset  # Gemma scales by (1 + w)
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the references do, then scale in the model dtype (Llama) or
        # scale in float32 too and cast back (Gemma, OLMo 2): the same in float32, not in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.upcast:
            weight = self.weight.float() + self.offset if self.offset else self.weight.float()
            return (xf * weight).to(x.dtype)
        return (self.weight + self.offset if self.offset else self.weight) * xf.to(x.dtype)


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def capped_attention(
    q: torch.Tensor,  # [1, heads, n, hd]
    keys: torch.Tensor,  # [1, kv_heads, kv_len, hd]
    values: torch.Tensor,  # [1, kv_heads, kv_len, hd]
    mask: torch.Tensor,  # [1, 1, n, kv_len] bool
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention with soft-capped scores (cap * tanh(s / cap), before the mask), which SDPA lacks.
    -> [1, heads, n, hd]"""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale  # [1, heads, n, kv_len]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ values


def paged_attention(
    q: torch.Tensor,  # [T, heads, hd], rotated
    k: torch.Tensor,  # [T, kv_heads, hd], rotated
    v: torch.Tensor,  # [T, kv_heads, hd]
    batch: ForwardBatch,
    k_cache: torch.Tensor,  # [slots, kv_heads, hd], this layer's pool seen flat
    v_cache: torch.Tensor,
    *,
    window: int | None,
    window_group: int,  # which of the batch's prompt-chunk masks is this window's
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Write the step's keys and values into the pool, then attend: the decode block over each
    row's blocks in place, each prompt chunk over its gathered window. -> [T, heads * hd]"""
    heads, hd = q.shape[1], q.shape[2]
    # Every token's key and value first, so a chunk attends to earlier chunks of its own prompt
    # scheduled in the same step.
    write_tokens(k_cache, k, batch.write_slots)
    write_tokens(v_cache, v, batch.write_slots)
    outs: list[torch.Tensor] = []
    if batch.decode_rows:  # one query per row, over its blocks, read in place
        assert batch.decode_tables is not None and batch.decode_lengths is not None
        out = paged_decode_attention(
            q[: batch.decode_rows].contiguous(), k_cache, v_cache, batch.decode_tables, batch.decode_lengths,
            block_size=batch.block_size, window=window, scale=scale, softcap=softcap,
        )  # [D, heads, hd]
        outs.append(out.reshape(batch.decode_rows, heads * hd))
    for chunk in batch.chunks:  # one row each, so a chunk never mixes rows whatever the kernel
        qc = q[chunk.offset : chunk.offset + chunk.length].transpose(0, 1)[None]  # [1, heads, n, hd]
        keys = k_cache.index_select(0, chunk.kv_slots).transpose(0, 1)[None]  # [1, kv_heads, kv_len, hd]
        values = v_cache.index_select(0, chunk.kv_slots).transpose(0, 1)[None]
        mask = chunk.masks[window_group]
        if softcap is None:
            out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, enable_gqa=True, scale=scale)
        else:
            out = capped_attention(qc, keys, values, mask, scale, softcap)
        outs.append(out[0].transpose(0, 1).reshape(chunk.length, heads * hd))
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, heads * hd]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.split_sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self.window = cfg.layer_window(layer_idx)
        self.window_group = cfg.windows.index(self.window)  # which prompt-chunk mask applies
        self.rope_group = cfg.layer_rope(layer_idx)
        self.scale = cfg.scale
        self.softcap = cfg.attn_softcap
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"  # OLMo 2: over all heads at once
            norm = {"eps": cfg.rms_norm_eps, "offset": cfg.norm_offset, "upcast": cfg.norm_upcast}
            self.q_norm = RMSNorm(cfg.q_size if full else cfg.head_dim, **norm)
            self.k_norm = RMSNorm(cfg.kv_size if full else cfg.head_dim, **norm)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, rot]
        sin: torch.Tensor,  # [T, 1, rot]
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [slots, kv_heads, hd], this layer's pool seen flat
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.lora)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(tokens, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(tokens, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)  # [T, heads, head_dim]
        k = apply_rope(k, cos, sin)  # [T, kv_heads, head_dim]
        attended = paged_attention(q, k, v, batch, k_cache, v_cache, window=self.window,
                                   window_group=self.window_group, scale=self.scale, softcap=self.softcap)
        return self.o_proj(attended, batch.lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.activation = cfg.activation
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).split(self.intermediate, dim=-1)  # each [T, inter]
        return self.down_proj(activate(self.activation, gate) * up, lora)


def run_layer(layer: DecoderLayer, x: torch.Tensor, *args: object) -> torch.Tensor:
    """Call one decoder layer. Compiling this function (rather than the whole model) gives one
    graph that every layer of a kind reuses: layers differ only in their weights, which are graph
    inputs (and, in models with sliding-window layers, in their window: one graph per kind)."""
    return layer(x, *args)


LayerFn = Callable[..., torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        for name in cfg.norm_names():
            self.add_module(name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_upcast))
        self.roles = NORM_ROLES[cfg.norm_placement]  # (input, post-attention, pre-MLP, post-MLP)
        self.residual_multiplier = cfg.residual_multiplier
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)

    @property
    def device(self) -> torch.device:
        """Where the layer computes: a norm weight is never packed or quantized."""
        return getattr(self, self.roles[0] or self.roles[1]).weight.device  # type: ignore[arg-type]

    def _norm(self, role: int, x: torch.Tensor) -> torch.Tensor:
        name = self.roles[role]
        return x if name is None else getattr(self, name)(x)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        attended = self._norm(1, self.self_attn(self._norm(0, x), cos, sin, batch, k_cache, v_cache))
        x = x + (attended if self.residual_multiplier == 1.0 else attended * self.residual_multiplier)
        out = self._norm(3, self.mlp(self._norm(2, x), batch.lora))
        return x + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)
