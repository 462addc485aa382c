"""Penalties and logit controls (issue 21 item 2) against transformers' logits processors on the
same inputs, and through the engine against `generate` with those processors; rows with
controls share a step with rows without, whose tokens do not change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine import Engine
from server.logit_controls import LogitControls, RowControls, apply_controls
from server.runner import ModelRunner
from server.sampling import SamplingParams, filter_min_p
from server.sequence import GenerationRequest
from server.weights import build_model
from tests.server.families import make_family
from tests.server.fakes import Collector

V = 96
PROMPT = [5, 9, 14, 3, 30, 31, 7, 7, 60, 61, 62]


class OpenAIPenalties:
    """presence/frequency penalties as OpenAI defines them, over generated tokens only
    (transformers has no processor for them)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_each_control_equals_its_transformers_processor() -> None:
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, V, generator=g) * 3  # [1, V]
    history = torch.tensor([[5, 9, 9, 40, 3, 3, 3]])  # prompt (4) + generated (3)
    seen = torch.zeros(V, dtype=torch.bool)
    seen[history[0]] = True
    counts = torch.zeros(V)
    counts.index_add_(0, history[0, 4:], torch.ones(3))

    def ours(**controls: Any) -> torch.Tensor:
        row = RowControls.build(LogitControls(**controls), (2, 7, V + 5), V, torch.device("cpu"))  # V + 5: past the logits
        return apply_controls(scores[0], row, generated=3, seen=seen, counts=counts)

    want = RepetitionPenaltyLogitsProcessor(penalty=1.7)(history, scores.clone())[0]
    assert torch.equal(ours(repetition_penalty=1.7), want)
    want = SequenceBiasLogitsProcessor(sequence_bias=[[[5], 2.5], [[9], -100.0]])(history, scores.clone())[0]
    assert torch.equal(ours(logit_bias=((5, 2.5), (9, -100.0))), want)
    want = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=5, eos_token_id=[2, 7])(
        history, scores.clone())[0]
    assert torch.equal(ours(min_tokens=5), want)
    assert torch.equal(ours(min_tokens=3), scores[0])  # three generated: no longer held back
    want = OpenAIPenalties(4, presence=0.5, frequency=0.8)(history, scores.clone())[0]
    assert torch.allclose(ours(presence_penalty=0.5, frequency_penalty=0.8), want, atol=1e-6)
    warped = MinPLogitsWarper(min_p=0.2)(history, scores.clone())
    assert torch.equal(filter_min_p(scores.clone(), torch.tensor([0.2])), warped)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("controls") / "base"
    return folder, make_family("qwen2", folder, seed=8)


def generate(hf: Any, processors: list[Any], new_tokens: int = 12) -> list[int]:
    from transformers import LogitsProcessorList

    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList(processors))
    return out[0, len(PROMPT):].tolist()


def test_engine_rows_with_controls_equal_generate_and_leave_the_others_alone(base: tuple[Path, Any]) -> None:
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    folder, hf = base
    plain = generate(hf, [])
    eos = plain[1]  # a token the plain continuation emits early: min_tokens must hold it back
    cases = {
        "repetition": (LogitControls(repetition_penalty=1.8), [RepetitionPenaltyLogitsProcessor(penalty=1.8)]),
        "openai": (LogitControls(presence_penalty=1.5, frequency_penalty=1.0),
                   [OpenAIPenalties(len(PROMPT), presence=1.5, frequency=1.0)]),
        "min_tokens": (LogitControls(min_tokens=6), [MinNewTokensLengthLogitsProcessor(len(PROMPT), 6, [eos])]),
    }
    wants = {name: generate(hf, processors) for name, (_, processors) in cases.items()}
    assert all(want != plain for want in wants.values())  # every control changes the tokens here
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=4, max_len=64)
    engine = Engine(ModelRunner(model), eos_ids=frozenset({eos}), prefill_chunk=5)
    got = Collector()
    for name, (controls, _) in cases.items():
        engine.submit(GenerationRequest(name, PROMPT, 12, sampling=SamplingParams(temperature=0, controls=controls),
                                        ignore_eos=name != "min_tokens"), got)
    engine.submit(GenerationRequest("plain", PROMPT, 12, sampling=SamplingParams(temperature=0), ignore_eos=True), got)
    engine.run_until_idle()
    assert got.tokens["plain"] == plain
    assert got.tokens["repetition"] == wants["repetition"]
    assert got.tokens["openai"] == wants["openai"]
    # min_tokens: the first six tokens never stop on EOS; after that EOS ends the request.
    tokens = got.tokens["min_tokens"]
    assert tokens == wants["min_tokens"][: len(tokens)] and len(tokens) >= 6 and eos not in tokens[:6]


def test_repetition_penalty_sees_a_prompt_the_prefix_cache_served(base: tuple[Path, Any]) -> None:
    """A prompt whose blocks come from the prefix cache is not computed again, but its tokens
    still count for repetition_penalty: the tokens equal a cold run's."""
    folder, _ = base
    prompt = [3 + (i * 7) % 90 for i in range(70)]
    penalized = SamplingParams(temperature=0, controls=LogitControls(repetition_penalty=2.0))

    def engine() -> Engine:
        model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=2, max_len=128)
        return Engine(ModelRunner(model), eos_ids=frozenset(), prefill_chunk=16, prefix_caching=True)

    cold, warm = engine(), engine()
    got = Collector()
    cold.submit(GenerationRequest("cold", prompt, 8, sampling=penalized), got)
    cold.run_until_idle()
    warm.submit(GenerationRequest("fill", prompt, 2, sampling=SamplingParams(temperature=0)), got)
    warm.run_until_idle()
    warm.submit(GenerationRequest("warm", prompt, 8, sampling=penalized), got)
    warm.run_until_idle()
    assert sum(warm.blocks.prefix.hits.values()) >= 48  # the prompt really came from the cache
    assert got.tokens["warm"] == got.tokens["cold"]


def test_bad_words_equal_transformers_over_the_generated_tokens() -> None:
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(1, V, generator=g)
    words = ((7,), (9, 14), (3, 30, 31), (50, 51))
    for generated in ([1, 2], [5, 9], [8, 3, 30], [9, 14, 3], [50]):
        row = RowControls.build(LogitControls(bad_words=words), (), V, torch.device("cpu"))
        ours = apply_controls(scores[0], row, generated=len(generated), seen=None, counts=None, history=generated)
        want = NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=V - 1)(
            torch.tensor([generated]), scores.clone())[0]
        assert torch.equal(ours, want), generated
