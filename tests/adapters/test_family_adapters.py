"""PEFT adapters on every family with its own spec, through the slot bank: each row of a batch
that mixes two adapters and the base model equals PEFT's logits for that row's adapter, in
prefill and in a decode step. Phi-3's adapters target its fused `qkv_proj` and `gate_up_proj`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, unwrap
from tests.server.families import make_family

FAMILIES = ["gemma", "gemma2", "gemma3", "granite", "olmo2", "phi3", "phi4-mini"]
ATTENTION = {"phi3": ["qkv_proj", "o_proj"], "phi4-mini": ["qkv_proj"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_equals_peft(family: str, tmp_path: Path) -> None:
    base = make_family(family, tmp_path / "base", seed=1)
    specs = [dict(r=8, lora_alpha=16, target_modules="all-linear"),
             dict(r=4, lora_alpha=4, target_modules=ATTENTION.get(family, ["q_proj", "v_proj", "o_proj"]))]
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = []
    for i, spec in enumerate(specs):
        peft_model = make_peft_adapter(base, tmp_path / f"a{i}", seed=20 + i, **spec)
        with torch.no_grad():
            expected.append(peft_model(ids).logits[0])  # [S, V]
            if i == 0:
                with peft_model.disable_adapter():
                    base_logits = peft_model(ids).logits[0]
        base = unwrap(peft_model)
    expected.append(base_logits)
    assert all((e - base_logits).abs().max() > 1e-3 for e in expected[:2])  # each adapter matters

    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=3, max_len=32)
    bank = SlotBank(model, num_slots=2, max_rank=8)
    for slot in range(2):
        bank.load(slot, load_weights(tmp_path / f"a{slot}", bank, f"a{slot}"))
    slots = torch.tensor([0, 1, bank.null_slot])
    seq = ids.shape[1] - 1
    # Prefill S-1 tokens of the three rows in one forward, then decode the last token together.
    prompts = ids[:, :seq].expand(3, seq)
    positions = torch.arange(seq)[None].expand(3, seq)
    prefill = model.logits(model(prompts, positions, row_start=0, kv_len=seq, lora=bank.batch(slots)))  # [3, S-1, V]
    step = model.logits(model(ids[:, seq:].expand(3, 1), torch.full((3, 1), seq), row_start=0, kv_len=32,
                              lora=bank.batch(slots)))  # [3, 1, V]
    got = torch.cat([prefill, step], dim=1)
    for row in range(3):
        assert (got[row] - expected[row]).abs().max().item() < 1e-4, f"row {row} of {family}"
