"""Hotswapping adapters under torch.compile: zero recompilations, and no stale weights.

Slots of rank 32 hold adapters of ranks 16, 2 and 5: without the fixed rank window the window
would follow them (16, 8) and recompile. The reference is an independent eager twin (its own
model and bank, the chunked product), so a fault in the compiled dense product cannot hide in
it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch._dynamo

from adapters.slot_bank import SlotBank
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, unwrap
from tests.server.families import make_family


def test_swaps_never_recompile_and_match_eager(tmp_path: Path) -> None:
    base = make_family("llama-tied", tmp_path / "base")
    specs = [
        dict(r=16, lora_alpha=16, target_modules="all-linear"),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        dict(r=5, lora_alpha=5, target_modules=["down_proj"], use_rslora=True),
    ]
    folders = []
    for i, spec in enumerate(specs):
        base = unwrap(make_peft_adapter(base, tmp_path / f"a{i}", seed=i, **spec))
        folders.append(tmp_path / f"a{i}")
    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=4, max_len=16, pack=False)
    bank = SlotBank(model, num_slots=2, max_rank=32, fixed_window=True)
    adapters = [load_weights(f, bank, f"a{i}") for i, f in enumerate(folders)]
    twin = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=4, max_len=16, pack=False)
    twin_bank = SlotBank(twin, num_slots=2, max_rank=32)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward)
    tokens = torch.tensor([[5], [6], [7], [8]])  # [B, 1]
    positions = torch.tensor([[3], [2], [1], [0]])
    slots = torch.tensor([0, 1, bank.null_slot, 0])

    def step(fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return model.logits(fn(tokens, positions, row_start=0, kv_len=16, lora=bank.batch(slots)))

    def reference() -> torch.Tensor:
        with torch.inference_mode():
            return twin.logits(twin.forward(tokens, positions, row_start=0, kv_len=16, lora=twin_bank.batch(slots)))

    def load(slot: int, weights: object) -> None:
        for target in (bank, twin_bank):
            if weights is None:
                target.clear(slot)
            else:
                target.load(slot, weights)  # type: ignore[arg-type]

    load(0, adapters[0])
    assert twin_bank.batch(slots).mix is None  # the twin really runs the other formulation
    first = step(compiled)  # compiles once
    assert torch.allclose(first, reference(), atol=1e-5)
    swaps = [
        (0, adapters[1]), (1, adapters[2]), (0, adapters[2]), (1, adapters[0]), (0, None), (1, adapters[1]),
    ]
    seen = [first]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for slot, weights in swaps:
            load(slot, weights)
            got = step(compiled)
            assert torch.allclose(got, reference(), atol=1e-5), f"stale after loading slot {slot}"
            assert not any(torch.allclose(got, s, atol=1e-4) for s in seen)  # the swap really changed it
            seen.append(got)
