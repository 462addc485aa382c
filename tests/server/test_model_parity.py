"""The native model against transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.engine import Engine
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.fakes import Collector
from tests.adapters.helpers import native_logits
from tests.server.families import FAMILIES, hf_greedy, make_family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family: str, tmp_path: Path) -> None:
    reference = make_family(family, tmp_path)
    ours = build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=2, max_len=64)
    ids = torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits  # [1, S, V]
    got = native_logits(ours, None, ids, row=1)
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_is_token_identical(family: str, tmp_path: Path) -> None:
    reference = make_family(family, tmp_path, seed=3)
    ours = build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=4, max_len=64)
    # Small prefill chunks so prompts span several chunks; rows of different lengths together.
    engine = Engine(ModelRunner(ours), eos_ids=frozenset(), prefill_chunk=5)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [40] * 7]
    got = Collector()
    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(str(i), prompt, max_tokens=12, sampling=SamplingParams(temperature=0)), got)
    engine.run_until_idle()
    for i, prompt in enumerate(prompts):
        assert got.tokens[str(i)] == hf_greedy(reference, prompt, 12), f"row {i} of {family}"


def test_sliding_window_is_applied(tmp_path: Path) -> None:
    """A window of 8 must change logits beyond position 8 compared with full attention."""
    make_family("mistral-window", tmp_path)
    windowed = build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=1, max_len=64)
    assert windowed.cfg.layer_windows == (8, 8)
    full = build_model(tmp_path, dtype=torch.float32, device="cpu", max_rows=1, max_len=64,
                       cfg=replace(windowed.cfg, layer_windows=()))
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    a = native_logits(windowed, None, ids)
    b = native_logits(full, None, ids)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)
