"""The native decoder-only model of every family with a spec (server/models/), over batched rows.

Module names follow Hugging Face (`model.layers.3.self_attn.o_proj`, `lm_head`) so that PEFT adapter
keys address them. Two projections are fused because one larger matmul beats several small ones on
the per-token path: `qkv_proj` holds q_proj, k_proj and v_proj stacked along its output, and
`gate_up_proj` holds gate_proj and up_proj (checkpoints that ship them fused, as Phi-3's, name
the fused modules themselves). `Transformer.linear_parts()` maps each Hugging Face projection
name to its fused module and output slice (server/model_config.py `layer_projections`).

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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapters.module_bank import ModuleBank
from server.decoder_layer import DecoderLayer, LayerFn, RMSNorm, run_layer
from server.forward_batch import ForwardBatch
from server.kv_cache import KVCache
from server.linear import Linear, onednn_packing_available, tensor_bytes
from server.model_config import ModelConfig, layer_projections
from server.paged_model import PagedModel
from server.rope import rope_tables

if TYPE_CHECKING:
    from server.placement import Placement


@dataclass(frozen=True)
class LinearPart:
    """One Hugging Face projection inside a (possibly fused) linear module."""

    module: Linear
    start: int  # first output feature of this projection within the module
    end: int


class Backbone(nn.Module):
    """The `model.` prefix of Hugging Face checkpoints: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_upcast)


class Transformer(PagedModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layer_devices: list[torch.device] = []  # set by allocate(), from where the weights are
        self._crossings: dict[int, torch.device] = {}  # boundary layer -> its device (allocate())
        self.embed_scale = 1.0  # the embedding multiplier in the compute dtype (allocate())
        self.module_bank: ModuleBank | None = None  # modules_to_save copies (attach_module_bank)

    def attach_module_bank(self, slots: int, max_vocab: int) -> ModuleBank:
        """Allocate `slots` module slots of `max_vocab` rows next to the embedding and the head."""
        self.module_bank = ModuleBank(
            num_slots=slots, vocab=self.cfg.vocab_size, max_vocab=max_vocab, hidden=self.cfg.hidden_size,
            dtype=self.compute_dtype, embed_device=self.model.embed_tokens.weight.device, head_device=self.lm_head.device,
            base_embed=self.model.embed_tokens.weight)
        return self.module_bank

    def full_modules(self) -> dict[str, tuple[str, int, int]]:
        """The modules an adapter may save whole (modules_to_save): name -> (kind, vocab, hidden)."""
        shape = (self.cfg.vocab_size, self.cfg.hidden_size)
        return {"model.embed_tokens": ("embed", *shape), "lm_head": ("head", *shape)}

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
        self.layer_devices = [layer.device for layer in self.model.layers]
        self._crossings = {i: self.layer_devices[i] for i in self.boundaries()}
        self.allocate_cache(max_rows=max_rows, max_len=max_len, num_blocks=num_blocks, block_size=block_size,
                            dtype=param.dtype, layer_devices=self.layer_devices)
        # Gemma rounds its embedding scale to the compute dtype first; the multiply is the same then.
        scale = cfg.embedding_multiplier
        self.embed_scale = float(torch.tensor(scale, dtype=param.dtype)) if cfg.embedding_multiplier_in_dtype else scale
        for group, rope in enumerate(cfg.ropes):  # one table per rope variant (Gemma 3: local, global)
            cos, sin = rope_tables(cfg.rot_dim, rope, max_len)
            self.register_buffer(f"rope_cos{group}", cos.to(param.device, param.dtype), persistent=False)
            self.register_buffer(f"rope_sin{group}", sin.to(param.device, param.dtype), persistent=False)

    def linear_parts(self) -> dict[str, LinearPart]:
        """Hugging Face projection name -> (fused module, output slice), e.g.
        `model.layers.0.self_attn.k_proj` -> (qkv_proj, q_size, q_size + kv_size)."""
        parts: dict[str, LinearPart] = {}
        projections = layer_projections(self.cfg)
        for i, layer in enumerate(self.model.layers):
            for projection in projections:
                module = layer.get_submodule(projection.module)
                start = 0
                for name, size in projection.parts:
                    parts[f"model.layers.{i}.{name}"] = LinearPart(module, start, start + size)
                    start += size
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
        x = self.embed(batch)  # [T, hidden]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        # [T, 1, rot] cos and sin per rope table
        ropes = [(getattr(self, f"rope_cos{g}")[batch.positions][:, None],
                  getattr(self, f"rope_sin{g}")[batch.positions][:, None]) for g in range(len(self.cfg.ropes))]
        run = layer_fn or run_layer
        for i, layer in enumerate(self.model.layers):
            device = self._crossings.get(i)
            if device is not None:  # a device-map boundary: the hidden state and the step's inputs move
                x, batch = x.to(device), batch.to(device)
                ropes = [(cos.to(device), sin.to(device)) for cos, sin in ropes]
            k_cache, v_cache = self.cache.layer(i)
            cos, sin = ropes[layer.self_attn.rope_group]
            x = run(layer, x, cos, sin, batch, k_cache, v_cache)
        return self.model.norm(x.to(self.model.norm.weight.device))

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """The tokens' embeddings # [T, hidden]; tokens of rows on a module slot read its copy."""
        if batch.embed_copies is None or self.module_bank is None:
            return self.model.embed_tokens(batch.tokens)
        # An added token's id exists only in its adapter's copy: the base lookup never sees it.
        x = self.model.embed_tokens(batch.tokens.clamp(max=self.cfg.vocab_size - 1))
        return self.module_bank.embed_tokens(x, batch.tokens, *batch.embed_copies)

    def logits(self, hidden: torch.Tensor, heads: Sequence[int | None] | None = None) -> torch.Tensor:
        """Project hidden states # [n, hidden] to float32 vocabulary logits, on the home device.
        `heads`: each row's module slot (modules_to_save; None: the base head). # [n, vocab]"""
        logits = self.lm_head(hidden.to(self.lm_head.device)).float().to(self.home_device)
        post = partial(final_logits, divisor=self.cfg.logits_divisor, softcap=self.cfg.final_softcap)
        if heads is None or self.module_bank is None:
            return post(logits)
        return self.module_bank.logits(post(logits), hidden, heads, post)


def final_logits(logits: torch.Tensor, *, divisor: float, softcap: float | None) -> torch.Tensor:
    """Granite divides the logits, Gemma 2 soft-caps them (cap * tanh(l / cap)). # [..., vocab]"""
    if divisor != 1.0:
        logits = logits / divisor
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
