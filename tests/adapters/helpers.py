"""Build PEFT adapters with random non-zero weights on tiny models, and run the native model with slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapters.peft_format import read_adapter_dir
from adapters.slot_bank import SlotBank
from adapters.validation import AdapterWeights, validate
from server.model import Transformer


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


def native_logits(model: Transformer, bank: SlotBank, ids: torch.Tensor, slot: int, *, row: int = 0) -> torch.Tensor:
    """Full-sequence logits of one row on `slot` (bank.null_slot = base). ids # [1, S]"""
    seq = ids.shape[1]
    lora = bank.batch(torch.tensor([slot]))
    hidden = model(ids, torch.arange(seq)[None], row_start=row, kv_len=seq, lora=lora)
    return model.logits(hidden)
