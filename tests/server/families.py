"""Tiny random-weight checkpoints of every supported family, written as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class name, model class name, overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32,
            ),
            head_dim=16,
        ),
    ),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    # Families with their own spec (server/models/). Windows of 8 and soft caps that bite on
    # random weights, so every feature changes the logits of a 24-token test.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(head_dim=16, query_pre_attn_scalar=1, sliding_window=8, attn_logit_softcapping=0.15,
             final_logit_softcapping=0.4),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8, pad_token_id=0)),
    # Phi-3.5 / Phi-3-128k style LongRoPE (factor 4 over an original context of 64).
    "phi3-longrope": (
        "Phi3Config", "Phi3ForCausalLM",
        dict(pad_token_id=0, original_max_position_embeddings=64,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                              "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}),
    ),
    # Phi-4-mini style: a quarter of each head passes through unrotated, tied embeddings.
    "phi4-mini": (
        "Phi3Config", "Phi3ForCausalLM",
        dict(pad_token_id=0, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
    ),
    "granite": (
        "GraniteConfig", "GraniteForCausalLM",
        dict(embedding_multiplier=3.0, attention_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0),
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=0)),
}

# Architectures without a native spec, served through the transformers-backed path: GPT-NeoX fuses
# q/k/v per head in one `query_key_value` and rotates a quarter of each head; Phi (1/1.5/2) runs
# attention and MLP in parallel off one LayerNorm, with a `dense` output projection.
TRANSFORMERS_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_act="gelu", layer_norm_eps=1e-5)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5)),
}


def make_family(name: str, folder: Path, *, seed: int = 0, **overrides: Any) -> Any:
    """Save a random-weight HF model of family `name` into `folder`; return the HF model (eval, fp32)."""
    import transformers

    config_cls, model_cls, extra = {**FAMILIES, **TRANSFORMERS_FAMILIES}[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # Default init leaves norms at 1 and biases at 0; randomise them so they are really tested.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


# The embedded SmolLM2 tokenizer (49152 ids) and chat template, copied next to tiny weights so the
# tokenizer and chat paths run for real on a model that loads in a blink.
CHAT_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_chat_llama(folder: Path, *, seed: int = 0, family: str = "llama-tied") -> Path:
    """A 2-layer random model (a llama unless `family` says) with the embedded model's tokenizer
    and chat template in `folder`."""
    import shutil

    from server.model_source import resolve_model

    make_family(
        family, folder, seed=seed, vocab_size=CHAT_VOCAB, intermediate_size=128, max_position_embeddings=256
    )
    embedded = resolve_model(None)  # converts the embedded model once if the cache lacks it
    for name in TOKENIZER_FILES:
        shutil.copy(embedded / name, folder / name)
    return folder


def make_cycle_llama(folder: Path, cycle: list[int]) -> Path:
    """A tiny chat llama (the embedded tokenizer) whose greedy next token after cycle[i] is
    cycle[i + 1] (wrapping): attention and MLP add nothing, so the last hidden state is the
    token's own embedding, a one-hot in a dimension of its own, and the untied head maps that
    dimension to the next token of the cycle. Exact text tests (a character cut by max_tokens)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from server.model_source import resolve_model

    make_family("llama-mha-untied", folder, vocab_size=CHAT_VOCAB, max_position_embeddings=256)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    embed, head = tensors["model.embed_tokens.weight"], torch.zeros_like(tensors["lm_head.weight"])
    for i, token in enumerate(cycle):
        embed[token] = 0.0
        embed[token, i] = 1.0
        head[cycle[(i + 1) % len(cycle)], i] = 100.0
    tensors["lm_head.weight"] = head
    save_file(tensors, path, metadata={"format": "pt"})
    embedded = resolve_model(None)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded / name, folder / name)
    return folder


def hf_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' (or PEFT's) greedy continuation of one prompt, EOS ignored: the reference
    for the engine's greedy tokens."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
