"""Build a native Transformer from a Hugging Face folder of safetensors files.

Weights are read with safetensors only (never pickle). Hugging Face keys are mapped onto the fused
modules by the model's own projection layout (`Transformer.linear_parts()`): q/k/v projections
into `qkv_proj`, gate/up into `gate_up_proj`, or, for checkpoints that ship them fused, one to one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from server.errors import UnsupportedModelError
from server.linear import Linear
from server.model import LinearPart, Transformer
from server.model_config import ModelConfig, load_model_config

if TYPE_CHECKING:
    from server.placement import Placement

def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UnsupportedModelError(
                f"{folder} holds only pickle weights (*.bin/*.pt); loraswap never unpickles: "
                "convert them to safetensors first"
            )
        raise UnsupportedModelError(f"{folder} has no *.safetensors weights")
    return files


def _target(model: Transformer, parts: dict[str, LinearPart], key: str) -> tuple[torch.Tensor, slice] | None:
    """Where a checkpoint tensor lands: (destination parameter, output-row slice)."""
    module_name, _, kind = key.rpartition(".")
    part = parts.get(module_name)
    if part is not None and kind in ("weight", "bias"):
        param = getattr(part.module, kind)
        if param is None:  # a bias the config says the model has not
            return None
        return param, slice(part.start, part.end)
    if key == "lm_head.weight" and model.cfg.tie_word_embeddings:
        return None  # tied: the embedding is the head
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return None
    return param, slice(0, param.shape[0])


def load_weights(model: Transformer, folder: Path) -> None:
    """Copy every expected tensor from the folder's safetensors into the (already built) model."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    expected = set(names.values())
    filled: dict[str, int] = {name: 0 for name in expected}
    parts = model.linear_parts()
    ignored_prefixes = ("model.rotary_emb",)
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                target = _target(model, parts, key)
                if target is None:
                    if key != "lm_head.weight" and not key.startswith(ignored_prefixes):
                        raise UnsupportedModelError(f"unexpected tensor {key!r} in {path.name}")
                    continue
                param, rows = target
                tensor = handle.get_tensor(key)
                dest = param.data[rows]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise UnsupportedModelError(
                        f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor.to(dest.dtype))
                filled[names[id(param)]] += rows.stop - rows.start
    missing = [n for n in sorted(expected) if filled[n] < model.get_parameter(n).shape[0]]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UnsupportedModelError(f"checkpoint is missing {len(missing)} tensors: {shown}")


def build_model(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    max_rows: int,
    max_len: int,
    cfg: ModelConfig | None = None,
    pack: bool = True,
    quantization: str | None = None,
    quantize_lm_head: bool = False,
    placement: Placement | None = None,
    kv_blocks: int | None = None,
    block_size: int = 16,
) -> Transformer:
    """Load config and weights from `folder`; allocate a KV pool of `kv_blocks` blocks of
    `block_size` positions (default: max_rows sequences of max_len) for up to max_rows sequences.
    `quantization` (int8, nf4, fp4) quantizes the decoder projections with bitsandbytes; `pack`
    reorders the remaining float32 CPU weights for oneDNN (see server/linear.py). `placement`
    (a device map) puts each part, its KV cache and quantized weights on its own device;
    without one everything goes on `device`."""
    cfg = cfg or load_model_config(folder)
    if quantize_lm_head:  # checked before any weight is read
        if quantization is None:
            raise UnsupportedModelError("--quantize-lm-head needs --quantization")
        if cfg.tie_word_embeddings:
            raise UnsupportedModelError(
                "--quantize-lm-head needs an untied lm_head; this model ties it to the embedding, which stays unquantized"
            )
    with torch.device("meta"):
        model = Transformer(cfg)
    if placement is None:
        model = model.to_empty(device=device)
    else:
        model.place(placement)
    model = model.to(dtype)
    model.tie_weights()
    targets = _stage_on_cpu(model, quantize_lm_head) if quantization is not None else {}
    load_weights(model, folder)
    if quantization is not None:
        model.quantize_linears(quantization, targets)
    if quantize_lm_head:
        model.lm_head.quantize(quantization, targets[model.lm_head])
    if pack:
        model.pack_linears(batch_hint=max_rows)
    model.allocate(max_rows=max_rows, max_len=max_len, num_blocks=kv_blocks, block_size=block_size)
    return model.eval().requires_grad_(False)


def _stage_on_cpu(model: Transformer, with_head: bool) -> dict[Linear, torch.device]:
    """Give the projections about to be quantized CPU weights to load into, and return where each
    belongs: only the quantized copy goes to the device, so a GPU never holds a layer's full
    precision weights (what `--device-map auto` plans for)."""
    modules = model.decoder_linears() + ([model.lm_head] if with_head else [])
    targets = {m: m.weight.device for m in modules}
    for m in modules:
        m.weight = torch.nn.Parameter(torch.empty_like(m.weight, device="cpu"), requires_grad=False)
    return targets
