"""The transformers-backed model (`--model-impl transformers`): any decoder-only architecture that
transformers loads and whose attention goes through its attention interface.

transformers' own modules compute the model (embeddings, norms, rotary embeddings, MLPs, heads);
loraswap supplies the rest, as vLLM's Transformers backend does:

- attention: an attention function registered with transformers as "loraswap" receives each
  layer's rotated q, k, v over the step's flat tokens and runs loraswap's paged attention (the KV
  block pool, the decode kernel, per-chunk prompt attention), so batching, prefix caching and
  preemption are the engine's, unchanged;
- LoRA: every nn.Linear of the decoder becomes a `LoraLinear` in place (same name, same weights),
  to which the slot bank attaches its slots, so one batch mixes adapters as on the native path;
- the step's `ForwardBatch` reaches both through a context variable set around the forward.

Unpacked weights: the runner keeps a fixed decode shape and one forward per prompt chunk, which
keeps a request's tokens independent of the batch. Slower than a native spec, never different.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.decoder_layer import paged_attention
from server.errors import UnsupportedModelError
from server.forward_batch import ForwardBatch
from server.linear import tensor_bytes
from server.model import LinearPart, final_logits
from server.model_config import ModelConfig, eos_ids
from server.paged_model import PagedModel

ATTENTION_NAME = "loraswap"
_STEP: ContextVar[tuple[ForwardBatch, TransformersModel] | None] = ContextVar("loraswap_step", default=None)
# While set, the attention function only records each layer's (kv heads, head dim, sliding window):
# the probe forward that sizes the KV cache and the prompt masks from what the layers really
# compute, whatever the config says.
_PROBE: ContextVar[dict[int, tuple[int, int, int | None]] | None] = ContextVar("loraswap_probe", default=None)


class LoraLinear(nn.Linear):
    """A transformers nn.Linear with LoRA slots: the class of the loaded module is swapped, so
    its name, weights and place in the model stay."""

    lora: Any  # adapters.lora_layer.LoraSlots once a slot bank is attached

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def weight_norms_sq(self) -> torch.Tensor:
        """||W_i||^2 per output row # [out] float64 (DoRA's norms)."""
        return self.weight.detach().double().pow(2).sum(1)

    def weight_product(self, a: torch.Tensor) -> torch.Tensor:
        """a # [r, in] -> a W^T # [r, out], without the bias."""
        return a.to(self.weight.dtype) @ self.weight.detach().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in]
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        step = None if self.lora is None else _STEP.get()
        if step is not None and step[0].lora is not None:
            flat = self.lora.add_to(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), step[0].lora,
                                     self.bias)
            y = flat.view(y.shape)
        return y


# Keyword arguments models pass to their attention function that change nothing here (their
# values describe the flat batch transformers thinks it runs). Any other one with a value (sinks,
# position biases, sparse indices...) is a computation loraswap's attention does not do: refused.
_HARMLESS = frozenset({"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                       "output_attentions", "use_cache", "cache_position", "past_key_values", "past_key_value",
                       "layer_idx", "position_embeddings", "is_causal"})


def _attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
    softcap: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query # [1, heads, T, hd], key and value
    # [1, kv_heads, T, hd] -> (output # [1, T, heads, hd], no weights)."""
    probe = _PROBE.get()
    if probe is not None:
        _check_call(module, key, value, kwargs, probe)
        probe[module.layer_idx] = (key.shape[1], key.shape[3], sliding_window)
        return query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3]), None
    step = _STEP.get()
    if step is None:
        raise RuntimeError("loraswap attention called outside a loraswap forward")
    batch, model = step
    assert model.cache is not None
    heads, tokens, hd = query.shape[1], query.shape[2], query.shape[3]
    layer = module.layer_idx
    k_cache, v_cache = model.cache.layer(layer)  # sized by the probe: the shapes match
    out = paged_attention(
        query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1), value[0].transpose(0, 1), batch, k_cache,
        v_cache, window=sliding_window, window_group=model.window_groups[layer],
        scale=scaling if scaling is not None else hd**-0.5, softcap=softcap,
    )  # [T, heads * hd]
    return out.view(1, tokens, heads, hd), None


def _check_call(module: nn.Module, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any],
                seen: dict[int, tuple[int, int, int | None]]) -> None:
    """Refuse, during the probe forward, what the paged attention would compute wrongly."""
    name = type(module).__name__
    extra = sorted(k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False)
    if extra:
        raise UnsupportedModelError(f"{name} passes {', '.join(extra)} to its attention, which loraswap's paged "
                                    "attention does not implement")
    if module.layer_idx in seen:
        raise UnsupportedModelError(f"{name}: two attention calls for layer {module.layer_idx} in one forward")
    if value.shape != key.shape:
        raise UnsupportedModelError(f"{name}: values {tuple(value.shape)} differ in shape from keys "
                                    f"{tuple(key.shape)}; the KV cache holds equal shapes")


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # loraswap masks inside its attention (causal, windows, block tables)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def generic_config(hf_config: Any) -> ModelConfig:
    """The sizes the engine needs (KV cache, limits) from any transformers text config; the KV
    shapes and windows are then taken from the layers themselves (probed_config)."""
    text = hf_config.get_text_config()
    heads, hidden = int(text.num_attention_heads), int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    unknown = sorted(set(getattr(text, "layer_types", None) or ()) - {"full_attention", "sliding_attention"})
    if unknown:  # chunked attention and the like: the windows the probe records would not say it
        raise UnsupportedModelError(f"{text.model_type!r} has layers of type {', '.join(unknown)}; loraswap's "
                                    "attention does full and sliding-window layers")
    return ModelConfig(
        model_type=text.model_type, vocab_size=int(text.vocab_size), hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        rms_norm_eps=1e-6, max_position_embeddings=int(getattr(text, "max_position_embeddings", None) or 2048),
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        qkv_bias=False, o_bias=False, mlp_bias=False,
        bos_token_id=getattr(text, "bos_token_id", None), eos_token_ids=eos_ids({"eos_token_id": text.eos_token_id}),
    )


class TransformersModel(PagedModel):
    def __init__(self, hf: nn.Module, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.hf = hf
        head = hf.get_output_embeddings()
        self._names = {name for name, _ in hf.named_modules() if name}
        self._targets: dict[str, LoraLinear] = {}
        for name, module in hf.named_modules():
            if type(module) is nn.Linear and module is not head:
                module.__class__ = LoraLinear
                module.lora = None
                self._targets[name] = module  # type: ignore[assignment]
        self.layer_devices: list[torch.device] = []
        # Each layer's prompt-chunk mask: the index of its window among the batch's (cfg.windows).
        self.window_groups = [cfg.windows.index(cfg.layer_window(i)) for i in range(cfg.num_hidden_layers)]
        self._head = head_transform(hf.config.get_text_config())  # refused at load, not at the first request

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def home_device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    def all_packed(self) -> bool:
        return False  # transformers' own kernels: the runner keeps batch-invariant fixed shapes

    def linear_parts(self) -> dict[str, LinearPart]:
        """Every nn.Linear of the model but the head, by its checkpoint name, as one part each."""
        return {name: LinearPart(module, 0, module.out_features) for name, module in self._targets.items()}  # type: ignore[arg-type]

    def hf_module_names(self) -> set[str]:
        return set(self._names)

    def allocate(self, *, max_rows: int, max_len: int, num_blocks: int | None = None, block_size: int = 16) -> None:
        self.layer_devices = [self.home_device] * self.cfg.num_hidden_layers
        self.allocate_cache(max_rows=max_rows, max_len=max_len, num_blocks=num_blocks, block_size=block_size,
                            dtype=self.compute_dtype, layer_devices=self.layer_devices)

    def memory_footprint(self) -> dict[str, int]:
        linear = sum(tensor_bytes(p) for m in self._targets.values() for p in m.parameters(recurse=False))
        total = sum(tensor_bytes(p) for p in self.hf.parameters())  # tied weights counted once
        cache = 0 if self.cache is None else sum(tensor_bytes(t) for t in self.cache.buffers())
        return {"linear_bytes": linear, "other_weight_bytes": total - linear, "kv_cache_bytes": cache}

    def forward_batch(self, batch: ForwardBatch, layer_fn: object = None) -> torch.Tensor:
        """transformers' base model over the step's flat tokens as one sequence of positions; the
        attention function keeps rows apart. -> final hidden states # [T, hidden]"""
        if self.cache is None:
            raise RuntimeError("call allocate() before forward()")
        token = _STEP.set((batch, self))
        try:
            out = self.hf.base_model(input_ids=batch.tokens[None], position_ids=batch.positions[None], use_cache=False)
        finally:
            _STEP.reset(token)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor, heads: object = None) -> torch.Tensor:
        """The model's head, then what its causal-LM class does to the logits after it (see
        head_transform). # [..., vocab] float32. No module slots on this path (`heads` unused:
        validation refuses modules_to_save here)."""
        logits = self.hf.get_output_embeddings()(hidden).float()
        multiplier, softcap = self._head
        if multiplier != 1.0:
            logits = logits * multiplier
        return final_logits(logits, divisor=1.0, softcap=softcap)


# model_type -> (config attribute, how the causal-LM head applies it). Heads are read from
# transformers' modeling files; a model that sets one of these attributes and is not listed is
# refused rather than guessed (HyperCLOVA X multiplies by a `logits_scaling` Granite divides by).
_HEAD_SCALES: dict[str, tuple[str, str]] = {
    "granite": ("logits_scaling", "divide"), "granitemoe": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"), "granitemoehybrid": ("logits_scaling", "divide"),
    "hyperclovax": ("logits_scaling", "multiply"), "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
}
_SCALE_ATTRIBUTES = ("logits_scaling", "logit_scale", "output_multiplier_scale", "lm_head_multiplier")


def head_transform(text: Any) -> tuple[float, float | None]:
    """(multiplier, soft cap) the causal-LM head applies to the logits of this text config."""
    softcap = getattr(text, "final_logit_softcapping", None)
    known = _HEAD_SCALES.get(text.model_type)
    if known is not None:
        value = float(getattr(text, known[0], None) or 1.0)
        return (1.0 / value if known[1] == "divide" else value), softcap
    unknown = [a for a in _SCALE_ATTRIBUTES if getattr(text, a, None) not in (None, 1, 1.0)]
    if unknown:
        raise UnsupportedModelError(f"{text.model_type!r} sets {', '.join(unknown)}: how its head applies that is "
                                    "not known to loraswap's transformers-backed path")
    return 1.0, softcap


def probed_config(hf: nn.Module, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the KV heads, head size and sliding window of each layer as its attention really
    computes them (GPT-NeoX, for one, ignores a num_key_value_heads its config may carry), from a
    one-token forward."""
    shapes: dict[int, tuple[int, int, int | None]] = {}
    token = _PROBE.set(shapes)
    try:
        with torch.no_grad():
            device = hf.get_input_embeddings().weight.device
            hf.base_model(input_ids=torch.ones(1, 1, dtype=torch.long, device=device),
                          position_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        _PROBE.reset(token)
    kv_shapes = {shape[:2] for shape in shapes.values()}
    if sorted(shapes) != list(range(cfg.num_hidden_layers)) or len(kv_shapes) != 1:
        raise UnsupportedModelError(f"{cfg.model_type!r}: attention layers {sorted(shapes)} with KV shapes "
                                    f"{sorted(kv_shapes)}; loraswap needs one shape for layers 0.."
                                    f"{cfg.num_hidden_layers - 1}")
    (kv_heads, head_dim), = kv_shapes
    windows = tuple(shapes[i][2] for i in range(cfg.num_hidden_layers))
    return replace(cfg, num_key_value_heads=kv_heads, head_dim=head_dim,
                   layer_windows=windows if any(w is not None for w in windows) else ())


def _rope_types(text: Any) -> set[str]:
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] if isinstance(params, dict) else []
    found = {p.get("rope_type", p.get("type")) for p in [params, *nested] if isinstance(p, dict)}
    return {t for t in found if isinstance(t, str)}


def check_servable(hf_config: Any) -> None:
    """Refuse, before loading, what this path cannot serve, saying why."""
    varying = _rope_types(hf_config.get_text_config()) & {"dynamic", "longrope"}
    if varying:
        raise UnsupportedModelError(
            f"{hf_config.model_type!r} uses {', '.join(sorted(varying))} rope scaling, which transformers recomputes "
            "from the longest sequence in the batch: a request's keys would change with what runs beside it")
    if getattr(hf_config, "vision_config", None) is not None or getattr(hf_config, "audio_config", None) is not None:
        raise UnsupportedModelError(f"model_type {hf_config.model_type!r} is a vision-language (or audio) model; "
                                    "loraswap serves decoder-only text models")
    if getattr(hf_config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {hf_config.model_type!r} is an encoder-decoder model; "
                                    "loraswap serves decoder-only text models")


def _check_attention(hf: nn.Module, model_type: str) -> None:
    attention = [m for m in hf.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    if not attention:
        raise UnsupportedModelError(f"{model_type!r}: no attention module of transformers' attention interface "
                                    "found (layer_idx, is_causal)")
    if not all(m.is_causal for m in attention):
        raise UnsupportedModelError(f"{model_type!r} attends bidirectionally (an encoder); loraswap serves "
                                    "decoder-only models")


def _causal_lm(hf_config: Any, build: Any) -> nn.Module:
    """`build(cls)` with the model's causal-LM class, as refusals that say why."""
    from transformers import AutoModelForCausalLM

    check_servable(hf_config)
    register_attention()
    try:
        return build(AutoModelForCausalLM)
    except ValueError as exc:  # no causal-LM class for this config, or no attention-interface support
        raise UnsupportedModelError(f"transformers cannot serve {hf_config.model_type!r} as a decoder-only model "
                                    f"through its attention interface: {str(exc).splitlines()[0]}") from exc


def check_architecture(hf_config: Any) -> None:
    """Refuse what this path cannot serve from the config alone (the model built on the meta
    device: no memory, no weights read)."""
    with torch.device("meta"):
        hf = _causal_lm(hf_config, lambda auto: auto.from_config(hf_config, attn_implementation=ATTENTION_NAME))
    _check_attention(hf, hf_config.model_type)


def load_transformers_model(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> TransformersModel:
    """Load `folder` with transformers (safetensors only, no remote code) and wrap it; allocate()
    follows, once the KV cache is sized from the probed `cfg`."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    hf = _causal_lm(hf_config, lambda auto: auto.from_pretrained(
        folder, dtype=dtype, attn_implementation=ATTENTION_NAME, use_safetensors=True, trust_remote_code=False))
    _check_attention(hf, hf_config.model_type)
    hf = hf.to(device).eval().requires_grad_(False)
    return TransformersModel(hf, probed_config(hf, generic_config(hf_config)))
