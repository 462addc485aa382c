"""Adapters in slots give PEFT's logits: ranks, alphas, rsLoRA, patterns, target subsets, families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.slot_bank import SlotBank
from server.model import Transformer
from server.weights import build_model
from tests.adapters.helpers import load_weights, make_peft_adapter, native_logits, unwrap
from tests.server.families import make_family

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

CASES: dict[str, dict[str, Any]] = {
    "r1-attention": dict(r=1, lora_alpha=1, target_modules=ATTENTION),
    "r8-all-linear": dict(r=8, lora_alpha=32, target_modules="all-linear"),
    "r16-mlp-rslora": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "r64-all-linear": dict(r=64, lora_alpha=128, target_modules="all-linear"),
    "patterns": dict(
        r=8, lora_alpha=16, target_modules="all-linear",
        rank_pattern={"q_proj": 2, "down_proj": 12}, alpha_pattern={"v_proj": 5.0, "layers.1.mlp.up_proj": 40.0},
    ),
    "regex-layers": dict(r=4, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(q|v)_proj"),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
}


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_peft(family: str, case: str, tmp_path: Path) -> None:
    base = make_family(family, tmp_path / "base")
    model = build_model(tmp_path / "base", dtype=torch.float32, device="cpu", max_rows=2, max_len=32)
    bank = SlotBank(model, num_slots=3, max_rank=64)
    peft_model = make_peft_adapter(base, tmp_path / "adapter", seed=7, **CASES[case])
    weights = load_weights(tmp_path / "adapter", bank)
    bank.load(1, weights)
    ids = torch.randint(3, 96, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_model(ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits
    got = native_logits(model, bank, ids, slot=1, row=1)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes something
    assert (got - expected).abs().max().item() < 1e-4
    assert (native_logits(model, bank, ids, slot=bank.null_slot) - base_logits).abs().max() < 1e-5


@pytest.fixture(scope="module")
def four_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny llama folder and 4 PEFT adapter folders of different ranks and targets."""
    root = tmp_path_factory.mktemp("mixed")
    base = make_family("llama-tied", root / "base")
    specs = [
        dict(r=16, lora_alpha=16, target_modules="all-linear"),
        dict(r=4, lora_alpha=8, target_modules=ATTENTION),
        dict(r=8, lora_alpha=8, target_modules=["down_proj"], use_rslora=True),
        dict(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]),
    ]
    folders = []
    for i, spec in enumerate(specs):
        base = unwrap(make_peft_adapter(base, root / f"a{i}", seed=10 + i, **spec))
        folders.append(root / f"a{i}")
    return root / "base", folders


def loaded_bank(base_dir: Path, folders: list[Path], *, rows: int = 8, slots: int = 4) -> tuple[Transformer, SlotBank]:
    """The native model with a slot bank holding adapter i in slot i."""
    model = build_model(base_dir, dtype=torch.float32, device="cpu", max_rows=rows, max_len=32)
    bank = SlotBank(model, num_slots=slots, max_rank=16)
    for slot, folder in enumerate(folders):
        bank.load(slot, load_weights(folder, bank, f"a{slot}"))
    return model, bank


def test_mixed_batch_rows_equal_alone(four_adapters: tuple[Path, list[Path]]) -> None:
    """Decode one step for 4 adapter rows and a base row together; each row equals its solo run."""
    model, bank = loaded_bank(*four_adapters)
    prompts = [torch.randint(3, 96, (1, 6 + row), generator=torch.Generator().manual_seed(row)) for row in range(5)]
    slots = [0, 1, 2, 3, bank.null_slot]
    # Prefill each row alone, then decode all five rows in one step.
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        n = ids.shape[1]
        model(ids, torch.arange(n)[None], row_start=row, kv_len=n, lora=bank.batch(torch.tensor([slot])))
    next_tokens = torch.tensor([[50], [51], [52], [53], [54]])
    positions = torch.tensor([[p.shape[1]] for p in prompts])
    together = model.logits(model(next_tokens, positions, row_start=0, kv_len=32, lora=bank.batch(torch.tensor(slots))))
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        full = torch.cat([ids, next_tokens[row : row + 1]], dim=1)
        alone = native_logits(model, bank, full, slot, row=7)[:, -1]
        assert (together[row] - alone).abs().max().item() < 1e-5, f"row {row} (slot {slot})"


def test_mixed_batch_matches_peft(four_adapters: tuple[Path, list[Path]]) -> None:
    base_dir, folders = four_adapters
    model, bank = loaded_bank(base_dir, folders)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(9))
    # PEFT's reference, rebuilt from the saved folders.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for slot, folder in enumerate(folders):
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
        with torch.no_grad():
            expected = reference(ids).logits
        assert (native_logits(model, bank, ids, slot) - expected).abs().max().item() < 1e-4


def test_hotswap_leaves_no_residue(four_adapters: tuple[Path, list[Path]]) -> None:
    base_dir, folders = four_adapters
    model, bank = loaded_bank(base_dir, [], rows=2, slots=2)
    rank16, rank4 = load_weights(folders[0], bank), load_weights(folders[1], bank)
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    bank.load(1, rank4)
    fresh = native_logits(model, bank, ids, 1)
    bank.clear(1)
    base = native_logits(model, bank, ids, bank.null_slot)
    bank.load(0, rank16)
    bank.load(0, rank4)  # rank 16 all-linear, then rank 4 attention-only, same slot
    assert torch.equal(native_logits(model, bank, ids, 0), fresh)
    assert torch.equal(native_logits(model, bank, ids, 1), base)  # cleared slot = base model
    assert bank.ranks == [4, 0]
    # Slot 0 (slot-major: a # [K+1, R, P, in], b # [K+1, R, out]): nothing past rank 4 anywhere,
    # and nothing at all in the modules the rank-4 adapter does not target.
    for name, (a, part, b) in bank._where.items():
        past_a, past_b = a[0, 4:, part], b[0, 4:]
        assert past_a.numel() > 0 and past_b.numel() > 0, name
        assert past_a.abs().sum() == 0 and past_b.abs().sum() == 0, name
        if name not in rank4.modules:
            assert a[0, :, part].abs().sum() == 0 and b[0].abs().sum() == 0, name
    assert set(rank16.modules) - set(rank4.modules), "the first adapter must reach modules the second does not"


def test_hotswap_slot_contents_equal_a_fresh_load(four_adapters: tuple[Path, list[Path]]) -> None:
    """After any sequence of loads and clears, a slot holds exactly what one load into an empty
    slot writes: the incremental zeroing leaves nothing behind in A or B."""
    base_dir, folders = four_adapters
    swapped = SlotBank(build_model(base_dir, dtype=torch.float32, device="cpu", max_rows=1, max_len=8), num_slots=2, max_rank=16)
    fresh = SlotBank(build_model(base_dir, dtype=torch.float32, device="cpu", max_rows=1, max_len=8), num_slots=2, max_rank=16)
    weights = [load_weights(f, swapped, f"a{i}") for i, f in enumerate(folders)]
    for order in ([0, 1], [1, 0, 3], [2, 0, 3, 1], [3, 2]):
        for i in order:
            swapped.load(1, weights[i])
        fresh.clear(1)
        fresh.load(1, weights[order[-1]])
        for (name, got), (_, want) in zip(swapped.named_buffers(), fresh.named_buffers()):
            assert torch.equal(got, want), f"{name} differs after loading {order}"
    swapped.clear(1)
    for name, buffer in swapped.named_buffers():  # A and B zero, DoRA's s = 1: the base model
        assert torch.equal(buffer, torch.ones_like(buffer) if name.startswith("s") else torch.zeros_like(buffer)), name


def test_decode_after_a_hotswap_uses_the_new_weights(four_adapters: tuple[Path, list[Path]]) -> None:
    """Eager decode keeps each module's gathered slot weights while the rows' slots stay the same;
    a hotswap into one of those slots must still reach the very next step."""
    base_dir, folders = four_adapters
    # Slot 0 keeps the rank-16 adapter, so the rank window (part of the key) stays 16 across the swap.
    model, bank = loaded_bank(base_dir, folders[:2], rows=4, slots=2)
    tokens = torch.tensor([[50], [51], [52], [53]])
    positions = torch.zeros(4, 1, dtype=torch.int64)

    def step(model: Transformer, bank: SlotBank) -> torch.Tensor:
        lora = bank.batch(torch.tensor([1, 1, 1, bank.null_slot]))
        return model.logits(model(tokens, positions, row_start=0, kv_len=32, lora=lora))

    before = step(model, bank)
    assert torch.equal(step(model, bank), before)  # the second step reuses the gathered weights
    window = bank.window()
    bank.load(1, load_weights(folders[2], bank, "a2"))
    assert bank.window() == window
    after = step(model, bank)
    fresh_model, fresh_bank = loaded_bank(base_dir, [folders[0], folders[2]], rows=4, slots=2)
    assert torch.equal(after, step(fresh_model, fresh_bank))
    assert not torch.equal(after[:3], before[:3])
    assert torch.equal(after[3], before[3])  # the base-model row is untouched
