"""Native Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) over batched sequence rows.

Module names follow Hugging Face (`model.layers.3.self_attn.o_proj`, `lm_head`) so that PEFT adapter
keys address them. Two projections are fused because one larger matmul beats several small ones on
the per-token path: `qkv_proj` holds q_proj, k_proj and v_proj stacked along its output, and
`gate_up_proj` holds gate_proj and up_proj. `Transformer.linear_parts()` maps each Hugging Face
projection name to its fused module and output slice.

Under a device map (`place`) each part lives on its own device, with its KV cache and LoRA slots;
only the hidden state crosses devices, where consecutive layers differ (the forward's per-row
inputs follow it there, once per boundary, not once per layer).

A forward pass runs a `ForwardBatch` (server/forward_batch.py): every token the engine scheduled
in one step, flat, with its position and KV pool slot; a decode block of rows, one token
each, and prompt chunks of one row each. Projections, norms and the MLP run over all tokens
at once; attention runs per kind (batched over each run of decode rows that shares a window,
per chunk for prompts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.forward_batch import CacheLayout, ForwardBatch, PromptChunk, build_forward_batch
from server.kv_cache import KVCache, blocks_for, write_tokens
from server.linear import Linear, onednn_packing_available, tensor_bytes
from server.model_config import ModelConfig
from server.paged_attention import paged_decode_attention
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
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, head_dim]
        sin: torch.Tensor,  # [T, 1, head_dim]
        batch: ForwardBatch,
        k_cache: torch.Tensor,  # [slots, kv_heads, hd], this layer's pool seen flat
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.lora)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(tokens, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(tokens, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)  # [T, heads, head_dim]
        k = apply_rope(k, cos, sin)  # [T, kv_heads, head_dim]
        # Every token's key and value first, so a chunk attends to earlier chunks of its own
        # prompt scheduled in the same step.
        write_tokens(k_cache, k, batch.write_slots)
        write_tokens(v_cache, v, batch.write_slots)
        outs: list[torch.Tensor] = []
        if batch.decode_rows:  # one query per row, over its blocks, read in place
            assert batch.decode_tables is not None and batch.decode_lengths is not None
            out = paged_decode_attention(
                q[: batch.decode_rows].contiguous(), k_cache, v_cache, batch.decode_tables, batch.decode_lengths,
                block_size=batch.block_size, window=cfg.sliding_window,
            )  # [D, heads, hd]
            outs.append(out.reshape(batch.decode_rows, cfg.q_size))
        for chunk in batch.chunks:  # one row each, so a chunk never mixes rows whatever the kernel
            qc = q[chunk.offset : chunk.offset + chunk.length].transpose(0, 1)[None]  # [1, heads, n, hd]
            keys = k_cache.index_select(0, chunk.kv_slots).transpose(0, 1)[None]  # [1, kv_heads, kv_len, hd]
            values = v_cache.index_select(0, chunk.kv_slots).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk.mask, enable_gqa=True)
            outs.append(out[0].transpose(0, 1).reshape(chunk.length, cfg.q_size))
        attended = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, q_size]
        return self.o_proj(attended, batch.lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).split(self.intermediate, dim=-1)  # each [T, inter]
        return self.down_proj(F.silu(gate) * up, lora)


def run_layer(layer: DecoderLayer, x: torch.Tensor, *args: object) -> torch.Tensor:
    """Call one decoder layer. Compiling this function (rather than the whole model) gives one
    graph that every layer reuses: layers differ only in their weights, which are graph inputs."""
    return layer(x, *args)


LayerFn = Callable[..., torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x), batch.lora)


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
        self._max_rows = 0  # sequences decoded together (set by allocate())
        self.max_len = 0  # positions per sequence (set by allocate())
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
    def compute_dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def max_rows(self) -> int:
        """Sequences one decode step carries at most (0 before allocate())."""
        return self._max_rows

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

    def allocate(self, *, max_rows: int, max_len: int, num_blocks: int | None = None, block_size: int = 16) -> None:
        """Create the KV pool and rope tables: `num_blocks` blocks of `block_size` positions
        (default: enough for `max_rows` sequences of `max_len` positions each, the layout the
        direct `forward` uses), sequences of up to `max_len` positions, `max_rows` at once."""
        cfg = self.cfg
        param = self.model.embed_tokens.weight
        if num_blocks is None:
            num_blocks = max_rows * blocks_for(max_len, block_size)
        # A layer's norm weight is never packed or quantized, so it says where the layer lives.
        self.layer_devices = [layer.input_layernorm.weight.device for layer in self.model.layers]
        self._crossings = {i: self.layer_devices[i] for i in self.boundaries()}
        self._max_rows, self.max_len = max_rows, max_len
        self.cache = KVCache(
            num_layers=cfg.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            dtype=param.dtype,
            layer_devices=self.layer_devices,
        )
        cos, sin = rope_tables(cfg.head_dim, cfg.rope, max_len)
        self.register_buffer("rope_cos", cos.to(param.device, param.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(param.device, param.dtype), persistent=False)

    def cache_layout(self) -> CacheLayout:
        if self.cache is None:
            raise RuntimeError("call allocate() first")
        return CacheLayout(self.cache.block_size, self.cache.scratch_block, self.cache.zero_block)

    def fixed_share(self, row: int) -> list[int]:
        """Blocks [row * M, (row + 1) * M), M = the blocks of a max_len sequence: the table of a
        row that owns a fixed share of the pool (the direct `forward`, tools and tests that drive
        the runner without an engine)."""
        assert self.cache is not None
        share = blocks_for(self.max_len, self.cache.block_size)
        if (row + 1) * share > self.cache.num_blocks:
            raise ValueError(f"row {row} has no fixed share of a pool of {self.cache.num_blocks} KV blocks")
        return list(range(row * share, (row + 1) * share))

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

    def forward_batch(self, batch: ForwardBatch, layer_fn: LayerFn | None = None) -> torch.Tensor:
        """Run every token of `batch` through the model, writing their keys and values; returns
        the final hidden states # [T, hidden]. `layer_fn` runs each decoder layer (default
        `run_layer`; the runner passes a compiled one for decode)."""
        if self.cache is None:
            raise RuntimeError("call allocate() before forward()")
        x = self.model.embed_tokens(batch.tokens)  # [T, hidden]
        cos = self.rope_cos[batch.positions][:, None]  # [T, 1, head_dim]
        sin = self.rope_sin[batch.positions][:, None]
        run = layer_fn or run_layer
        for i, layer in enumerate(self.model.layers):
            device = self._crossings.get(i)
            if device is not None:  # a device-map boundary: the hidden state and the step's inputs move
                x, cos, sin, batch = x.to(device), cos.to(device), sin.to(device), batch.to(device)
            k_cache, v_cache = self.cache.layer(i)
            x = run(layer, x, cos, sin, batch, k_cache, v_cache)
        return self.model.norm(x.to(self.model.norm.weight.device))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, S] int64
        positions: torch.Tensor,  # [B, S] int64, absolute position of each token in its row
        *,
        row_start: int,
        kv_len: int,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """B rows from `row_start`, S tokens each -> hidden # [B, S, hidden]: one token per row is
        a decode block, longer rows are prompt chunks (a direct way in for tests and tools; the
        engine builds its ForwardBatch itself). Row r uses the blocks [r * M, (r + 1) * M), M =
        max_len / block_size, as if each row owned a fixed share of the pool. `lora`: from
        SlotBank.batch over the B rows."""
        layout = self.cache_layout()
        batch, seq = tokens.shape
        tables = [self.fixed_share(r) for r in range(row_start, row_start + batch)]
        host_positions = positions.tolist()
        common = {"window": lambda needed: kv_len, "sliding_window": self.cfg.sliding_window,
                  "device": tokens.device, "layout": layout}
        if seq == 1:
            fb = build_forward_batch(
                decode_tokens=tokens[:, 0], decode_positions=[p[0] for p in host_positions], decode_tables=tables,
                lora=lora, **common,
            )
        else:
            chunks = [PromptChunk(row, ids, pos[0], last=False)
                      for row, ids, pos in zip(range(batch), tokens.tolist(), host_positions)]
            fb = build_forward_batch(chunks=chunks, chunk_tables=tables,
                                     lora=None if lora is None else lora.per_row_tokens(seq), **common)
        return self.forward_batch(fb).view(batch, seq, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states to float32 vocabulary logits, on the home device. # [..., vocab]"""
        return self.lm_head(hidden.to(self.lm_head.device)).float().to(self.home_device)
