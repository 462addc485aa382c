"""Build PEFT adapters with random non-zero weights on tiny models, and run the native model with slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters.peft_format import read_adapter_dir
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights, validate
from server.engine import Engine
from server.model import Transformer
from server.runner import ModelRunner
from server.weights import build_model


def make_peft_adapter(base: Any, folder: Path, *, seed: int, **lora_kwargs: Any) -> Any:
    """Wrap `base` (an HF model) with a random LoRA adapter, save it to `folder`, return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(folder)
    return peft_model


def unwrap(peft_model: Any) -> Any:
    """The base HF model again, without LoRA layers, for the next adapter."""
    return peft_model.unload()


def load_weights(folder: Path, bank: SlotBank, name: str = "a") -> AdapterWeights:
    return validate(read_adapter_dir(folder, name), bank.spec(), name)


def slot_engine(base: Path, folders: list[Path], *, slots: int, rows: int, compile: bool = False,
                max_len: int = 64, **engine_kwargs: Any) -> tuple[Engine, dict[str, AdapterWeights]]:
    """An engine on `base` with `slots` LoRA slots of rank 8 and the adapters in `folders` as
    a0, a1, ... (their weights returned too); compiled and warmed up with `compile`."""
    model = build_model(base, dtype=torch.float32, device="cpu", max_rows=rows, max_len=max_len)
    bank = SlotBank(model, num_slots=slots, max_rank=8, fixed_window=compile)
    weights = {f"a{i}": load_weights(folder, bank, f"a{i}") for i, folder in enumerate(folders)}
    if compile:
        torch._dynamo.reset()
    engine = Engine(ModelRunner(model, bank, compile=compile), eos_ids=frozenset(), prefill_chunk=5,
                    slot_table=SlotTable(slots), adapter_weights=weights.__getitem__, **engine_kwargs)
    if compile:
        engine.runner.warm_up()
    return engine, weights


def native_logits(model: Transformer, bank: SlotBank | None, ids: torch.Tensor, slot: int | None = None, *,
                  row: int = 0) -> torch.Tensor:
    """Full-sequence logits of one row on `slot` (bank.null_slot, or no bank: the base model),
    prefilled as one chunk. ids # [1, S]"""
    seq = ids.shape[1]
    lora = None if bank is None or slot is None else bank.batch(torch.tensor([slot]))
    hidden = model(ids, torch.arange(seq)[None], row_start=row, kv_len=seq, lora=lora)
    return model.logits(hidden)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def projection_shapes(model_dir: Path) -> dict[str, tuple[str, int, int]]:
    """HF projection name -> (block, in, out) for the Llama-family checkpoint in model_dir."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {
        "q_proj": ("self_attn", hidden, q), "k_proj": ("self_attn", hidden, kv), "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", q, hidden), "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }


def write_random_adapter(
    folder: Path, model_dir: Path, *, rank: int, targets: list[str], seed: int, scale: float = 0.3
) -> Path:
    """A random PEFT LoRA adapter for model_dir's checkpoint, in the files PEFT saves."""
    shapes = projection_shapes(model_dir)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            block, d_in, d_out = shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def mixed_batch_logits(model: Transformer, bank: SlotBank, ids: torch.Tensor, slots: list[int],
                       scales: list[float] | None = None) -> torch.Tensor:
    """One prompt ids # [1, S] on len(slots) rows at once, row i on slots[i] (scaled by
    scales[i]): the first S-1 tokens prefilled in one forward, the last decoded in one step
    together. -> logits # [rows, S, V]"""
    return terms_batch_logits(model, bank, ids, bank.batch(torch.tensor(slots), scales or ()))


def terms_batch_logits(model: Transformer, bank: SlotBank, ids: torch.Tensor, lora: Any) -> torch.Tensor:
    """As mixed_batch_logits for a routing of the rows (`bank.mix_batch(...)`: row i adds its
    (slot, weight) terms). -> logits # [rows, S, V]"""
    rows, seq = lora.decode_tokens, ids.shape[1] - 1
    prefill = model(ids[:, :seq].expand(rows, seq), torch.arange(seq)[None].expand(rows, seq), row_start=0,
                    kv_len=seq, lora=lora)
    step = model(ids[:, seq:].expand(rows, 1), torch.full((rows, 1), seq), row_start=0, kv_len=model.max_len,
                 lora=lora)
    return model.logits(torch.cat([prefill, step], dim=1))


@contextmanager
def scaled_lora(peft_model: Any, scale: float) -> Iterator[Any]:
    """PEFT's model with every LoRA layer's scaling multiplied by `scale`, restored after."""
    from peft.tuners.lora import LoraLayer

    saved = {m: dict(m.scaling) for m in peft_model.modules() if isinstance(m, LoraLayer)}
    for module in saved:
        module.scaling = {k: v * scale for k, v in module.scaling.items()}
    try:
        yield peft_model
    finally:
        for module, scaling in saved.items():
            module.scaling = scaling


def peft_references(base: Any, root: Path, ids: torch.Tensor, specs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Save one random PEFT adapter per spec as root/a0, root/a1, ... on the HF model `base`;
    return PEFT's logits # [S, V] for ids # [1, S] under each adapter, then the base model's,
    after checking that every adapter changes them."""
    expected = []
    base_logits = None
    for i, spec in enumerate(specs):
        peft_model = make_peft_adapter(base, root / f"a{i}", seed=20 + i, **spec)
        with torch.no_grad():
            expected.append(peft_model(ids).logits[0])
            if base_logits is None:
                with peft_model.disable_adapter():
                    base_logits = peft_model(ids).logits[0]
        base = unwrap(peft_model)
    assert base_logits is not None and all((e - base_logits).abs().max() > 1e-3 for e in expected)
    return [*expected, base_logits]
