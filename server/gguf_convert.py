"""Read a llama or Gemma 3 GGUF checkpoint into Hugging Face tensors with the `gguf` package.

Why not transformers' GGUF loader: it builds the whole model first and needs `accelerate` for
that (a dependency its releases added), while the conversion only needs three steps that the
`gguf` package already provides or that are plain array math:

1. dequantize each tensor (`gguf.dequantize`, the same kernels transformers calls) to float32;
2. map its GGUF name (`blk.3.attn_q.weight`) to the Hugging Face name
   (`model.layers.3.self_attn.q_proj.weight`) through gguf's own name table;
3. undo what llama.cpp's converter did to the weights: it permutes the q and k rows of llama
   models, and stores Gemma's RMSNorm weights as 1 + w (Gemma scales by 1 + w; the Hugging
   Face checkpoint keeps w).

The config comes from transformers' GGUF metadata parser (no weights, no accelerate), the
tokenizer and chat template from its tokenizer converter, so the converted folder holds exactly
what transformers' own conversion gives (tests/server/test_gguf_convert.py checks that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from server.errors import ModelSourceError

# GGUF architecture -> (per-layer Hugging Face parameters, q/k rows permuted, norms stored as 1 + w).
# llama: the embedded model; gemma3: Gemma 3 text models (the 270M one is on the package index).
_LLAMA_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
ARCHITECTURES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "llama": (_LLAMA_LAYER, True, False),
    "gemma3": ((*_LLAMA_LAYER, "pre_feedforward_layernorm", "post_feedforward_layernorm", "self_attn.q_norm",
                "self_attn.k_norm"), False, True),
}


def unpermute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation. Per head, Hugging Face orders the rotary rows as
    [first halves..., second halves...]; llama.cpp interleaves them as pairs (x0, x_half, x1, ...).
    `weights` is [heads * head_dim, ...]; the result has the same shape."""
    half = weights.shape[0] // heads // 2
    pairs = weights.reshape(heads, half, 2, *weights.shape[1:])  # [heads, half, 2, ...]
    return pairs.swapaxes(1, 2).reshape(weights.shape)  # [heads, 2, half, ...] -> rows


def llama_hf_names(num_layers: int, *, tied: bool, architecture: str = "llama") -> list[str]:
    """The parameter names of the Hugging Face model of `architecture` (lm_head only when untied)."""
    per_layer = ARCHITECTURES[architecture][0]
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{part}.weight" for i in range(num_layers) for part in per_layer]
    return names if tied else [*names, "lm_head.weight"]


def gguf_to_hf_names(num_layers: int, *, tied: bool, architecture: str = "llama") -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, from gguf's own name table."""
    import gguf

    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, architecture.upper()), num_layers)
    mapping: dict[str, str] = {}
    for hf_name in llama_hf_names(num_layers, tied=tied, architecture=architecture):
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:  # a gguf release that renamed its table: refuse, never guess
            raise ModelSourceError(f"the gguf package has no GGUF name for {hf_name}")
        mapping[gguf_name] = hf_name
    return mapping


def read_tensors(path: Path, *, num_heads: int, num_kv_heads: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file as a float32 Hugging Face parameter (name -> tensor)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    if architecture not in ARCHITECTURES:
        raise ModelSourceError(f"{path.name}: GGUF architecture {architecture!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    scaling = f"{architecture}.rope.scaling.factor"
    if architecture == "gemma3" and scaling in reader.fields:
        # Gemma 3 4B and larger: transformers' GGUF config parser drops the rope scaling (and
        # 27B's query scale), so the converted model would be quietly wrong.
        factor = float(reader.fields[scaling].parts[reader.fields[scaling].data[0]][0])
        if factor != 1.0:
            raise ModelSourceError(f"{path.name}: a Gemma 3 GGUF with rope scaling (x{factor:g}: 4B and larger) is "
                                   "not converted, its scaling would be lost; use the safetensors checkpoint")
    tied = all(tensor.name != "output.weight" for tensor in reader.tensors)
    names = gguf_to_hf_names(num_layers, tied=tied, architecture=architecture)
    _, permuted, norm_shift = ARCHITECTURES[architecture]
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name not in names:
            raise ModelSourceError(f"{path.name}: unexpected tensor {tensor.name}")
        weights = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if permuted and tensor.name.endswith("attn_q.weight"):
            weights = unpermute_rows(weights, num_heads)
        elif permuted and tensor.name.endswith("attn_k.weight"):
            weights = unpermute_rows(weights, num_kv_heads)
        elif norm_shift and names[tensor.name].endswith("norm.weight"):
            weights = weights - 1.0
        tensors[names[tensor.name]] = torch.from_numpy(np.ascontiguousarray(weights))
    missing = sorted(set(names.values()) - tensors.keys())
    if missing:
        raise ModelSourceError(f"{path.name}: missing tensors {', '.join(missing[:5])}")
    return tensors
