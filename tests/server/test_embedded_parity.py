"""The embedded SmolLM2-135M-Instruct: native logits and greedy generations against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import Engine
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest, TokenOutput
from server.text_stream import TextStream
from server.weights import build_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def reference(smollm_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def native(smollm_dir: Path):  # type: ignore[no-untyped-def]
    return build_model(smollm_dir, dtype=torch.float32, device="cpu", max_rows=4, max_len=256)


def chat_ids(tokenizer, question: str) -> list[int]:  # type: ignore[no-untyped-def]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def test_logits_match_transformers(reference, native, smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([chat_ids(smollm_tokenizer, QUESTIONS[0])])
    with torch.no_grad():
        expected = reference(ids).logits
    hidden = native(ids, torch.arange(ids.shape[1])[None], row_start=2, kv_len=ids.shape[1])
    got = native.logits(hidden)
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_batch_is_token_identical(reference, native, smollm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(ModelRunner(native), eos_ids=frozenset({2}), prefill_chunk=16)
    prompts = [chat_ids(smollm_tokenizer, q) for q in QUESTIONS]
    tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}

    streams = {str(i): TextStream(smollm_tokenizer, prompt) for i, prompt in enumerate(prompts)}

    def sink(event: TokenOutput) -> None:  # the engine gives token ids; the text side detokenizes
        tokens.setdefault(event.request_id, []).extend(event.token_ids)
        texts[event.request_id] = texts.get(event.request_id, "") + streams[event.request_id].feed(event).text

    for i, prompt in enumerate(prompts):
        request = GenerationRequest(str(i), prompt, max_tokens=24, sampling=SamplingParams(temperature=0))
        engine.submit(request, sink)
    engine.run_until_idle()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),  # <|im_end|> is also the pad id
                max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2,
            )[0, len(prompt):].tolist()
        assert tokens[str(i)] == expected
    assert "Paris" in texts["0"]
