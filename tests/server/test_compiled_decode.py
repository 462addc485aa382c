"""--compile: warm-up builds every decode graph (two: LoRA on and off); serving and adapter swaps never recompile.

The slots have rank 32 and the adapters ranks 3 to 20, so without the fixed rank window the
window would follow the loaded ranks (8, 16, 32) and recompile; the eager engine the compiled one
is compared with runs the row-resident product, not the compiled dense one. Both run on oneDNN-
packed weights where the build has them (the compiled graph reaches them through an opaque op)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from server.engine import Engine
from server.linear import Linear, onednn_packing_available
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.fakes import Collector
from tests.server.test_adapter_scheduling import random_adapters
from tests.server.test_quantization import force_avx512bf16


MAX_RANK = 32
RANKS = [3, 12, 20, 6]


def make_engine(folder: Path, *, compile: bool, quantization: str | None = None) -> Engine:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=4, max_len=128,
                        quantization=quantization)
    bank = SlotBank(model, num_slots=2, max_rank=MAX_RANK, fixed_window=compile)
    store = random_adapters(bank, 4, ranks=RANKS)
    return Engine(
        ModelRunner(model, bank, compile=compile), eos_ids=frozenset(),
        slot_table=SlotTable(2), adapter_weights=store.__getitem__,
    )


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_warm_up_compiles_every_shape_then_nothing_recompiles(
    tiny_dir: Path, quantization: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if quantization == "nf4":
        # As on a CPU with AVX512-BF16, where bitsandbytes' own repacking broke compiled nf4 on
        # this model's 96-wide down_proj (tests/server/test_quantization.py tests both hosts).
        force_avx512bf16(monkeypatch, "avx512bf16")
    torch._dynamo.reset()
    engine = make_engine(tiny_dir, compile=True, quantization=quantization)
    engine.runner.warm_up()
    assert engine.runner.warm_graphs == 2  # LoRA on and off; block tables have one width for every length
    assert engine.runner.recompilations == 0

    # 4 adapters on 2 slots force swaps; 70-token prompts span five KV blocks.
    requests = [
        GenerationRequest(
            f"r{i}", [3 + (i * 7 + j) % 80 for j in range(70 if i % 3 == 0 else 6)], max_tokens=5,
            sampling=SamplingParams(temperature=0), adapter=None if i % 5 == 4 else f"ad{i % 4}",
        )
        for i in range(10)
    ]
    compiled = Collector()
    for r in requests:
        engine.submit(r, compiled)
    engine.run_until_idle()
    assert engine.slot_table is not None and engine.slot_table.counters.loads >= 4
    assert engine.runner.recompilations == 0
    stats = engine.stats()["compile"]
    assert stats == {"enabled": True, "graphs": engine.runner.warm_graphs, "recompilations": 0}

    eager_engine = make_engine(tiny_dir, compile=False, quantization=quantization)
    eager = Collector()
    for r in requests:
        eager_engine.submit(r, eager)
    eager_engine.run_until_idle()
    assert compiled.tokens == eager.tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2", "phi4-mini", "granite"])
def test_other_families_compile_once_per_layer_kind(family: str, tmp_path: Path) -> None:
    """Gemma 2 and 3: sliding-window and global layers (soft-capped scores; two rope tables), so
    the compiled layer has one graph per kind and LoRA state; OLMo 2's post-norms, Phi-4-mini's
    partial rotary embedding on fused checkpoint projections, Granite's multipliers: one kind.
    Swaps and windows never recompile, and the tokens are eager's."""
    from tests.server.families import make_family

    make_family(family, tmp_path)
    kinds = {"gemma2": 2, "gemma3": 2}.get(family, 1)  # sliding and global layers
    torch._dynamo.reset()
    engine = make_engine(tmp_path, compile=True)
    engine.runner.warm_up()
    assert engine.runner.warm_graphs == 2 * kinds  # (each layer kind) x (LoRA on, off)
    requests = [
        GenerationRequest(f"r{i}", [3 + (i * 5 + j) % 80 for j in range(30 if i % 2 else 7)], max_tokens=6,
                          sampling=SamplingParams(temperature=0), adapter=None if i == 4 else f"ad{i % 4}")
        for i in range(6)
    ]
    results = []
    for current in (engine, make_engine(tmp_path, compile=False)):
        got = Collector()
        for r in requests:
            current.submit(r, got)
        current.run_until_idle()
        results.append(got.tokens)
    assert engine.runner.recompilations == 0
    assert results[0] == results[1]


@pytest.mark.skipif(not onednn_packing_available(), reason="no oneDNN weight packing in this torch build")
def test_packed_weights_are_released_with_their_model(tiny_dir: Path) -> None:
    """The compiled graph finds packed weights by handle; the registry must not keep them alive."""
    from server import linear

    model = build_model(tiny_dir, dtype=torch.float32, device="cpu", max_rows=2, max_len=64)
    handles = [int(m.handle) for m in model.modules() if isinstance(m, Linear) and m.packed is not None]
    assert handles and all(h in linear._PACKED for h in handles)
    del model
    gc.collect()
    assert not any(h in linear._PACKED for h in handles)
