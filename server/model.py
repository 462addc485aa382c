"""Native Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) over batched sequence rows.

Module names follow Hugging Face (`model.layers.3.self_attn.o_proj`, `lm_head`) so that PEFT adapter
keys address them. Two projections are fused because one larger matmul beats several small ones on
the per-token path: `qkv_proj` holds q_proj, k_proj and v_proj stacked along its output, and
`gate_up_proj` holds gate_proj and up_proj. `Transformer.linear_parts()` maps each Hugging Face
projection name to its fused module and output slice.

Under a device map (`place`) each part lives on its own device, with its KV cache and LoRA slots;
only the hidden state crosses devices, where consecutive layers differ (the forward's per-row
inputs follow it there, once per boundary, not once per layer).

A forward pass takes B contiguous cache rows starting at `row_start`, S tokens per row at explicit
per-row positions, and attends over the first `kv_len` cache positions of those rows. Decode is
`S == 1` over rows [0, B); prefill is one row with S prompt tokens. All shapes are fixed by
(B, S, kv_len), which the engine draws from a few buckets, so a compiled step is reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.kv_cache import KVCache, write_and_view
from server.linear import Linear, onednn_packing_available, tensor_bytes
from server.model_config import ModelConfig
from server.rope import apply_rope, rope_tables

if TYPE_CHECKING:
    from adapters.lora_layer import LoraBatch
    from server.placement import Placement


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does, then scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass(frozen=True)
class LinearPart:
    """One Hugging Face projection inside a (possibly fused) linear module."""

    module: Linear
    start: int  # first output feature of this projection within the module
    end: int


def decode_attention(
    q: torch.Tensor,  # [B, heads, 1, hd]
    keys: torch.Tensor,  # [B, kv_heads, L, hd]
    values: torch.Tensor,  # [B, kv_heads, L, hd]
    mask: torch.Tensor,  # [B, 1, 1, L] bool, True = attend
) -> torch.Tensor:
    """Attention for one new token per row, computed so that a row's result is bit-identical
    whatever the batch size and the window length: batched matmuls (one independent product per
    row and kv head) and a row-wise softmax. The fused CPU SDPA kernel splits work by batch size
    and so changes a row's last bits when other rows join. -> # [B, heads, 1, hd]"""
    batch, heads, _, hd = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group, hd)  # query heads that share a kv head, side by side
    scores = (qg @ keys.transpose(-1, -2)) * hd**-0.5  # [B, kv_heads, group, L]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, L] broadcasts
    out = scores.softmax(dim=-1) @ values  # [B, kv_heads, group, hd]
    return out.reshape(batch, heads, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,  # [B, 1, S, head_dim]
        sin: torch.Tensor,  # [B, 1, S, head_dim]
        mask: torch.Tensor,  # [B, 1, S, kv_len] bool, True = attend
        rows: torch.Tensor,  # [B, 1] cache row of each batch row
        positions: torch.Tensor,  # [B, S]
        k_cache: torch.Tensor,  # [rows, kv_heads, max_len, hd], this layer's
        v_cache: torch.Tensor,
        row_start: int,
        kv_len: int,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x, lora)  # [B, S, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, heads, S, head_dim]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, kv_heads, S, head_dim]
        v = v.transpose(1, 2)  # [B, kv_heads, S, head_dim]
        keys = write_and_view(k_cache, k, row_start=row_start, rows=rows, positions=positions, kv_len=kv_len)
        values = write_and_view(v_cache, v, row_start=row_start, rows=rows, positions=positions, kv_len=kv_len)
        if seq == 1:
            out = decode_attention(q, keys, values, mask)
        else:  # prefill runs one row at a time, so it cannot mix rows whatever the kernel
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch, seq, cfg.q_size)  # [B, S, q_size]
        return self.o_proj(out, lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).split(self.intermediate, dim=-1)  # each [B, S, inter]
        return self.down_proj(F.silu(gate) * up, lora)


def run_layer(layer: DecoderLayer, x: torch.Tensor, *args: object) -> torch.Tensor:
    """Call one decoder layer. Compiling this function (rather than the whole model) gives one
    graph that every layer reuses: layers differ only in their weights, which are graph inputs."""
    return layer(x, *args[:-1], lora=args[-1])  # type: ignore[arg-type]


LayerFn = Callable[..., torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, *attn_args: object, lora: LoraBatch | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class Backbone(nn.Module):
    """The `model.` prefix of Hugging Face checkpoints: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cache: KVCache | None = None
        self.layer_devices: list[torch.device] = []  # set by allocate(), from where the weights are
        self._crossings: dict[int, torch.device] = {}  # boundary layer -> its device (allocate())

    def place(self, placement: Placement) -> None:
        """Materialise a meta-device model part by part on the devices `placement` names."""
        self.model.embed_tokens.to_empty(device=placement.embed)
        for layer, device in zip(self.model.layers, placement.layers, strict=True):
            layer.to_empty(device=device)
        self.model.norm.to_empty(device=placement.norm)
        self.lm_head.to_empty(device=placement.lm_head)

    @property
    def home_device(self) -> torch.device:
        """The embedding's device: token ids come in and logits go out there."""
        return self.model.embed_tokens.weight.device

    def boundaries(self) -> list[int]:
        """Layers whose input hidden state arrives from another device."""
        before = [self.home_device, *self.layer_devices]
        return [i for i, device in enumerate(self.layer_devices) if device != before[i]]

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def all_packed(self) -> bool:
        """Whether every projection runs on a oneDNN-packed weight (row-count-invariant kernels)."""
        return all(m.packed is not None for m in self.modules() if isinstance(m, Linear))

    def pack_linears(self, *, batch_hint: int) -> None:
        """Reorder every projection's weight for oneDNN (float32 on CPU only; otherwise a no-op)."""
        if not onednn_packing_available():
            return
        for module in self.modules():
            if isinstance(module, Linear):
                tied = module is self.lm_head and self.cfg.tie_word_embeddings
                module.pack(batch_hint=batch_hint, keep_dense=tied)

    def decoder_linears(self) -> list[Linear]:
        """The projections of the decoder layers (what quantization applies to; not lm_head)."""
        return [m for layer in self.model.layers for m in layer.modules() if isinstance(m, Linear)]

    def quantize_linears(self, method: str, devices: dict[Linear, torch.device] | None = None) -> None:
        """`devices`: where each projection's quantized copy goes (default: where its weight is)."""
        for module in self.decoder_linears():
            module.quantize(method, (devices or {}).get(module))

    def memory_footprint(self) -> dict[str, int]:
        """Bytes by kind: decoder projections (quantized or not), everything else of the weights
        (embedding, lm_head, norms), and the KV cache."""
        decoder = self.decoder_linears()
        in_decoder = {id(p) for m in decoder for p in m.parameters()}
        # Embedding and norms; named_parameters lists a tied lm_head weight once, as the embedding.
        other = sum(
            tensor_bytes(p) for name, p in self.named_parameters()
            if id(p) not in in_decoder and not name.startswith("lm_head.")
        )
        head = self.lm_head
        tied = head.weight is self.model.embed_tokens.weight
        if not tied or head.packed is not None:  # a tied, unpacked head is the embedding itself
            other += head.weight_bytes()
        cache = 0 if self.cache is None else sum(tensor_bytes(t) for t in self.cache.buffers())
        linear = sum(m.weight_bytes() for m in decoder)
        return {"linear_bytes": linear, "other_weight_bytes": other, "kv_cache_bytes": cache}

    def allocate(self, *, max_rows: int, max_len: int) -> None:
        """Create the KV cache and rope tables for `max_rows` sequences of up to `max_len` tokens."""
        cfg = self.cfg
        param = self.model.embed_tokens.weight
        # A layer's norm weight is never packed or quantized, so it says where the layer lives.
        self.layer_devices = [layer.input_layernorm.weight.device for layer in self.model.layers]
        self._crossings = {i: self.layer_devices[i] for i in self.boundaries()}
        self.cache = KVCache(
            num_layers=cfg.num_hidden_layers,
            max_rows=max_rows,
            max_len=max_len,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            layer_devices=self.layer_devices,
        )
        cos, sin = rope_tables(cfg.head_dim, cfg.rope, max_len)
        self.register_buffer("rope_cos", cos.to(param.device, param.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(param.device, param.dtype), persistent=False)

    def linear_parts(self) -> dict[str, LinearPart]:
        """Hugging Face projection name -> (fused module, output slice), e.g.
        `model.layers.0.self_attn.k_proj` -> (qkv_proj, q_size, q_size + kv_size)."""
        cfg = self.cfg
        parts: dict[str, LinearPart] = {}
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{i}"
            q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
            parts[f"{prefix}.self_attn.q_proj"] = LinearPart(attn.qkv_proj, 0, q)
            parts[f"{prefix}.self_attn.k_proj"] = LinearPart(attn.qkv_proj, q, q + kv)
            parts[f"{prefix}.self_attn.v_proj"] = LinearPart(attn.qkv_proj, q + kv, q + 2 * kv)
            parts[f"{prefix}.self_attn.o_proj"] = LinearPart(attn.o_proj, 0, cfg.hidden_size)
            parts[f"{prefix}.mlp.gate_proj"] = LinearPart(mlp.gate_up_proj, 0, inter)
            parts[f"{prefix}.mlp.up_proj"] = LinearPart(mlp.gate_up_proj, inter, 2 * inter)
            parts[f"{prefix}.mlp.down_proj"] = LinearPart(mlp.down_proj, 0, cfg.hidden_size)
        return parts

    def hf_module_names(self) -> set[str]:
        """Module names as the Hugging Face checkpoint of this model has them: fused projections
        appear as their parts (q_proj, k_proj, ...); runtime-only modules (the KV cache, anything
        attached inside a projection) are left out."""
        parts = self.linear_parts()
        fused = {id(part.module) for part in parts.values()}
        modules = dict(self.named_modules())
        names = set(parts)
        for name, module in modules.items():
            parent = modules.get(name.rpartition(".")[0])
            if not name or id(module) in fused or isinstance(module, KVCache) or isinstance(parent, Linear):
                continue
            names.add(name)
        return names

    def attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Which cache positions each query may attend to. # [B, 1, S, kv_len] bool"""
        keys = torch.arange(kv_len, device=positions.device)  # [kv_len]
        query = positions[:, :, None]  # [B, S, 1]
        mask = keys[None, None, :] <= query  # [B, S, kv_len]
        if self.cfg.sliding_window is not None:
            mask = mask & (query - keys[None, None, :] < self.cfg.sliding_window)
        return mask[:, None]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S] int64
        positions: torch.Tensor,  # [B, S] int64, absolute position of each token in its row
        *,
        row_start: int,
        kv_len: int,
        lora: LoraBatch | None = None,
        layer_fn: LayerFn | None = None,
    ) -> torch.Tensor:
        """Run B rows through the model, writing their keys/values; returns hidden # [B, S, hidden].
        `lora` routes each row through its LoRA slot (None: base model only). `layer_fn` runs each
        decoder layer (default `run_layer`; the runner passes a compiled one for decode)."""
        if self.cache is None:
            raise RuntimeError("call allocate() before forward()")
        x = self.model.embed_tokens(tokens)  # [B, S, hidden]
        cos = self.rope_cos[positions][:, None]  # [B, 1, S, head_dim]
        sin = self.rope_sin[positions][:, None]
        mask = self.attention_mask(positions, kv_len)
        # Cache rows of the batch, shared by every layer's key and value writes.
        rows = torch.arange(row_start, row_start + tokens.shape[0], device=tokens.device)[:, None]  # [B, 1]
        run = layer_fn or run_layer
        inputs = (cos, sin, mask, rows, positions)
        for i, layer in enumerate(self.model.layers):
            device = self._crossings.get(i)
            if device is not None:  # a device-map boundary: the hidden state and the step's inputs move
                x = x.to(device)
                inputs = tuple(t.to(device) for t in inputs)  # type: ignore[assignment]
                lora = None if lora is None else lora.to(device)
            k_cache, v_cache = self.cache.layer(i)
            x = run(layer, x, *inputs, k_cache, v_cache, row_start, kv_len, lora)
        return self.model.norm(x.to(self.model.norm.weight.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states to float32 vocabulary logits, on the home device. # [..., vocab]"""
        return self.lm_head(hidden.to(self.lm_head.device)).float().to(self.home_device)
