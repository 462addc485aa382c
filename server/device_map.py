"""`--device-map auto|cpu|cuda|cuda:N|<file.json>` for a model about to be loaded.

`server/placement.py` decides where parts go from sizes in bytes; this module supplies those sizes
before any weight is read (from the config, the dtype, the quantization, the KV cache and the LoRA
slots, which all live with their layer) and the devices this process can see with their free
memory. `auto` spreads the model over the visible GPUs and falls back to the CPU when none is
visible; it never spills layers onto the CPU on its own (a JSON map can).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapters.slot_sizing import FusedShape, bank_bytes, slot_bytes
from server.errors import UnsupportedModelError
from server.kv_cache import kv_bytes_per_token
from server.model_config import ModelConfig, layer_projections
from server.placement import (
    DeviceBudget,
    PartSizes,
    Placement,
    PlacementError,
    load_device_map,
    plan_auto,
    single_device,
)

INT8_SCALE_BYTES = 4  # LLM.int8(): one float32 scale per output row
NF4_BLOCK = 64  # 4-bit: one float32 absmax per 64 weights, plus a 16-entry float32 code table
NF4_CODE_BYTES = 16 * 4


class DeviceMapError(UnsupportedModelError):
    """The device map is invalid or the model does not fit (the message says by how much)."""


def projection_shapes(cfg: ModelConfig) -> list[FusedShape]:
    """(in, out, parts) of each fused projection of one decoder layer; `parts` = HF projections
    fused in it (they share one LoRA A tensor per slot)."""
    return [FusedShape(p.d_in, p.d_out, len(p.parts)) for p in layer_projections(cfg)]


def lora_slot_bytes(cfg: ModelConfig, *, max_rank: int, dtype_bytes: int) -> int:
    """Bytes of one LoRA slot of rank `max_rank` over every layer, known before any weight is read."""
    return slot_bytes(projection_shapes(cfg) * cfg.num_hidden_layers, max_rank=max_rank, dtype_bytes=dtype_bytes)


def linear_bytes(d_in: int, d_out: int, dtype_bytes: int, quantization: str | None) -> int:
    """Weight bytes of one projection as it is kept at run time (bias not included)."""
    n = d_in * d_out
    if quantization is None:
        return n * dtype_bytes
    if quantization == "int8":
        return n + d_out * INT8_SCALE_BYTES
    if quantization in ("nf4", "fp4"):
        return (n + 1) // 2 + -(-n // NF4_BLOCK) * 4 + NF4_CODE_BYTES
    raise ValueError(f"unknown quantization {quantization!r}")


def estimate_part_sizes(
    cfg: ModelConfig,
    *,
    dtype_bytes: int,
    quantization: str | None,
    quantize_lm_head: bool,
    kv_blocks: int,
    block_size: int,
    num_slots: int,
    max_rank: int,
    max_len: int = 0,
    module_slots: int = 0,
    max_vocab: int = 0,
) -> PartSizes:
    """Bytes of each part as it will sit on its device: a layer counts its weights, its KV cache
    and its LoRA slot tensors (null slot included); the embedding's part also holds the rope
    tables (cos and sin for `max_len` positions, one pair per rope variant). `module_slots` of
    `max_vocab` rows (modules_to_save) put an embedding copy each with the embedding and a head
    copy each with the head."""
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    biases = (cfg.q_size + 2 * cfg.kv_size) * cfg.qkv_bias + hidden * cfg.o_bias
    biases += (2 * cfg.intermediate_size + hidden) * cfg.mlp_bias
    qk_norms = {"none": 0, "head": 2 * cfg.head_dim, "full": cfg.q_size + cfg.kv_size}[cfg.qk_norm]
    norms = len(cfg.norm_names()) * hidden + qk_norms
    weights = sum(linear_bytes(i, o, dtype_bytes, quantization) for i, o, _ in projection_shapes(cfg))
    weights += (biases + norms) * dtype_bytes
    # Two blocks more than the pool: the scratch and zero blocks (server/kv_cache.py).
    per_position = kv_bytes_per_token(num_layers=1, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                      dtype_bytes=dtype_bytes)
    kv_cache = (kv_blocks + 2) * block_size * per_position
    slots = bank_bytes(slot_bytes(projection_shapes(cfg), max_rank=max_rank, dtype_bytes=dtype_bytes), num_slots)
    layer = weights + kv_cache + slots
    tied = cfg.tie_word_embeddings
    head = 0 if tied else linear_bytes(hidden, vocab, dtype_bytes, quantization if quantize_lm_head else None)
    rope_tables = len(cfg.ropes) * 2 * max_len * cfg.rot_dim * dtype_bytes
    copies = module_slots * max_vocab * hidden * dtype_bytes  # of one kind: embeddings, or heads
    return PartSizes(
        embed=vocab * hidden * dtype_bytes + rope_tables + copies * (2 if tied else 1),
        layers=[layer] * cfg.num_hidden_layers,
        norm=hidden * dtype_bytes,
        lm_head=head + (0 if tied else copies),
        tied=tied,
    )


def visible_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def gpu_budgets() -> list[DeviceBudget]:
    """Every visible GPU with the bytes free on it now (other processes' use counts)."""
    return [DeviceBudget(f"cuda:{i}", torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def resolve_device_map(
    spec: str,
    cfg: ModelConfig,
    sizes: Callable[[], PartSizes],
    *,
    available: list[str] | None = None,
    budgets: Callable[[], list[DeviceBudget]] = gpu_budgets,
) -> Placement:
    """The placement `spec` asks for on this machine. `sizes` is called only for `auto`."""
    available = visible_devices() if available is None else available
    try:
        placed = load_device_map(spec, cfg.num_hidden_layers, available=available, tied=cfg.tie_word_embeddings)
        if placed is not None:
            return placed
        gpus = budgets()
        if not gpus:  # auto on a machine without GPUs: everything on the CPU
            return single_device("cpu", cfg.num_hidden_layers)
        return plan_auto(sizes(), gpus)
    except PlacementError as exc:
        raise DeviceMapError(f"--device-map {spec}: {exc}") from exc


def describe(placement: Placement) -> dict[str, object]:
    """For logs and GET /admin/model: the compact map and where the hidden state crosses."""
    return {"map": placement.to_json(), "devices": placement.devices(), "boundaries": placement.boundaries()}
