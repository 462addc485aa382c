"""--max-loras auto: slot bytes computed from shapes equal what a real SlotBank allocates, the
budget arithmetic at its edges, the caps, and what start-up and GET /admin/model report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.slot_bank import SlotBank
from adapters.slot_sizing import (
    COMPILE_AUTO_SLOTS,
    MAX_AUTO_SLOTS,
    bank_bytes,
    format_bytes,
    fused_shapes,
    plan_slots,
    slot_bytes,
    slots_for_budget,
)
from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.device_map import lora_slot_bytes, projection_shapes
from adapters.errors import SlotBudgetError
from server.linear import tensor_bytes
from server.model_config import load_model_config
from server.weights import build_model
from tests.server.families import make_family
from tests.server.test_api import wait_ready

RANK = 8


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slot_sizing")
    names = ("llama-bias", "qwen3", "llama-mha-untied", "gemma2", "olmo2", "phi3")
    return {name: (make_family(name, root / name), root / name)[1] for name in names}


@pytest.mark.parametrize("family", ["llama-bias", "qwen3", "llama-mha-untied", "gemma2", "olmo2", "phi3"])
@pytest.mark.parametrize(("dtype", "num_slots", "rank"), [(torch.float32, 1, 8), (torch.bfloat16, 3, 16)])
def test_slot_bytes_equal_what_a_slot_bank_allocates(
    family_dirs: dict[str, Path], family: str, dtype: torch.dtype, num_slots: int, rank: int
) -> None:
    model = build_model(family_dirs[family], dtype=dtype, device="cpu", max_rows=2, max_len=32, pack=False)
    bank = SlotBank(model, num_slots=num_slots, max_rank=rank)
    allocated = sum(tensor_bytes(t) for t in bank.buffers())
    shapes = fused_shapes(model.linear_parts())
    per_slot = slot_bytes(shapes, max_rank=rank, dtype_bytes=dtype.itemsize)
    assert bank_bytes(per_slot, num_slots) == allocated  # the null slot counts
    # The config alone (what sizing uses before any weight is read) gives the same shapes.
    cfg = model.cfg
    assert sorted(shapes) == sorted(projection_shapes(cfg) * cfg.num_hidden_layers)
    assert lora_slot_bytes(cfg, max_rank=rank, dtype_bytes=dtype.itemsize) == per_slot


def test_slots_for_budget_at_its_edges() -> None:
    per = 1000
    assert slots_for_budget(2 * per - 1, per) == 0  # one slot plus the null slot do not fit
    assert slots_for_budget(2 * per, per) == 1
    assert slots_for_budget(5 * per - 1, per) == 3
    assert slots_for_budget(5 * per, per) == 4
    assert slots_for_budget(10**9 * per, per) == MAX_AUTO_SLOTS
    assert slots_for_budget(10 * per, per, cap=2) == 2
    with pytest.raises(ValueError):
        slots_for_budget(10, 0)


def test_auto_fills_the_budget_and_a_number_is_kept() -> None:
    plan = plan_slots("auto", budget_bytes=4500, per_slot_bytes=1000, rank=RANK, compiled=False)
    assert (plan.count, plan.bytes, plan.sized_by, plan.budget_bytes, plan.note) == (3, 4000, "memory", 4500, None)
    flag = plan_slots(20, budget_bytes=1, per_slot_bytes=1000, rank=RANK, compiled=True)  # budget ignored
    assert (flag.count, flag.bytes, flag.sized_by, flag.budget_bytes, flag.note) == (20, 21000, "flag", None, None)
    assert flag.info() == {"count": 20, "rank": RANK, "bytes_per_slot": 1000, "bytes": 21000,
                           "budget_bytes": None, "sized_by": "flag"}
    assert "--max-loras 20" in flag.describe()


def test_auto_under_compile_is_capped_and_says_why() -> None:
    plan = plan_slots("auto", budget_bytes=100 * 1000, per_slot_bytes=1000, rank=RANK, compiled=True)
    assert plan.count == COMPILE_AUTO_SLOTS
    assert plan.note is not None and "--compile" in plan.note and "99" in plan.note
    assert plan.note in plan.describe()
    small = plan_slots("auto", budget_bytes=4000, per_slot_bytes=1000, rank=RANK, compiled=True)
    assert (small.count, small.note) == (3, None)  # under the cap: what the budget holds
    huge = plan_slots("auto", budget_bytes=2**40, per_slot_bytes=1000, rank=RANK, compiled=False)
    assert huge.count == MAX_AUTO_SLOTS and huge.note is not None and "capped" in huge.note


def test_a_budget_below_one_slot_fails_with_what_one_slot_needs() -> None:
    with pytest.raises(SlotBudgetError, match=r"one slot of rank 8 takes 1000 B .* at least 1.95 KiB \(2000 bytes\)"):
        plan_slots("auto", budget_bytes=1999, per_slot_bytes=1000, rank=RANK, compiled=False)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 3 * 2**20 // 2, 2**30, 5 * 2**40)] == [
        "0 B", "1023 B", "1.00 KiB", "1.50 MiB", "1.00 GiB", "5.00 TiB"]


def tiny_slot_bytes(folder: Path) -> int:
    """One rank-RANK slot of the tiny model in float32 (auto dtype on the CPU)."""
    return lora_slot_bytes(load_model_config(folder), max_rank=RANK, dtype_bytes=4)


def test_too_small_a_budget_fails_before_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    per = tiny_slot_bytes(tiny_llama_dir)
    conf = Settings(model=str(tiny_llama_dir), device="cpu", max_num_seqs=2, max_model_len=64,
                    max_lora_rank=RANK, lora_memory=2 * per - 1, data_dir=tmp_path)
    with pytest.raises(SlotBudgetError, match=f"holds no LoRA slot.*{2 * per} bytes"):
        build_service(conf)


def test_admin_model_reports_slots_sized_by_memory(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    per = tiny_slot_bytes(tiny_llama_dir)
    budget = 4 * per + per // 2  # 3 slots and the null slot, half a slot to spare
    conf = Settings(model=str(tiny_llama_dir), device="cpu", max_num_seqs=2, max_model_len=64,
                    max_lora_rank=RANK, lora_memory=budget, data_dir=tmp_path)
    assert conf.max_loras == "auto"
    caplog.set_level(logging.INFO, logger="loraswap")
    with TestClient(create_app(lambda metrics: build_service(conf, metrics)), client=("127.0.0.1", 40000)) as client:
        ready = wait_ready(client)
        info = client.get("/admin/model").json()
    assert info["lora_slots"] == {"count": 3, "rank": RANK, "bytes_per_slot": per, "bytes": 4 * per,
                                  "budget_bytes": budget, "sized_by": "memory"}
    assert info["memory"]["lora_slot_bytes"] == 4 * per  # what the bank really allocated
    assert len(ready["slots"]["references"]) == 3
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA slots:")]
    assert lines == [f"LoRA slots: 3 of rank {RANK}, {format_bytes(per)} each, {format_bytes(4 * per)} with the "
                     f"null slot (sized by --lora-memory {format_bytes(budget)})"]
