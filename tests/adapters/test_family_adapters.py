"""PEFT adapters on every family with its own spec, through the slot bank: each row of a batch
that mixes two adapters and the base model equals PEFT's logits for that row's adapter, in
prefill and in a decode step. Phi-3's adapters target its fused `qkv_proj` and `gate_up_proj`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from server.weights import build_model
from tests.adapters.helpers import load_weights, mixed_batch_logits, peft_references
from tests.server.families import make_family

FAMILIES = ["gemma", "gemma2", "gemma3", "granite", "olmo2", "phi3", "phi4-mini"]
ATTENTION = {"phi3": ["qkv_proj", "o_proj"], "phi4-mini": ["qkv_proj"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_equals_peft(family: str, tmp_path: Path) -> None:
    base = make_family(family, tmp_path / "base", seed=1)
    specs = [dict(r=8, lora_alpha=16, target_modules="all-linear"),
             dict(r=4, lora_alpha=4, target_modules=ATTENTION.get(family, ["q_proj", "v_proj", "o_proj"]))]
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = peft_references(base, tmp_path, ids, specs)  # adapter 0, adapter 1, base
    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=3, max_len=32)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    for slot in range(2):
        bank.load(slot, load_weights(tmp_path / f"a{slot}", bank, f"a{slot}"))
    got = mixed_batch_logits(model, bank, ids, [0, 1, bank.null_slot])  # [3, S, V]
    for row in range(3):
        assert (got[row] - expected[row]).abs().max().item() < 1e-4, f"row {row} of {family}"
