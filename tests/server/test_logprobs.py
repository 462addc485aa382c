"""Log probabilities (issue 21 item 1) over HTTP, in process, on the tiny chat Llama: sampled and
prompt tokens' logprobs equal transformers' log_softmax on the same tokens (and PEFT's for an
adapter), in OpenAI's completions and chat shapes and vLLM's prompt_logprobs; echo with
max_tokens 0 scores a prompt; the numbers are the same alone and in a shared batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from server.logprob_format import TokenTexts
from server.logprobs import TokenLogprob, next_token_targets, token_logprobs
from tests.adapters.helpers import make_peft_adapter, unwrap
from tests.server.test_api import wait_ready

PROMPT = [1, 520, 33, 4000, 77, 1200, 9, 42]
ATOL = 1e-4


def test_token_logprobs_rank_and_top() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, -1.0, 0.0, 1.0]])
    got = token_logprobs(logits, torch.tensor([2, 0]), [2, 0])
    want = logits.log_softmax(-1)
    assert got[0] == TokenLogprob(2, want[0, 2].item(), 3, ((1, want[0, 1].item()), (3, want[0, 3].item())))
    assert got[1] == TokenLogprob(0, want[1, 0].item(), 1, ())
    assert next_token_targets([5, 6, 7], 1, 3) == [7, -1, -1]


def test_byte_level_tokens_report_their_own_bytes(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("naïve 日本", add_special_tokens=False)
    assert b"".join(texts.of(t)[1] for t in ids) == "naïve 日本".encode()
    assert texts.of(tokenizer.eos_token_id)[0] == tokenizer.eos_token


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any, Any]]:
    """The server (base and adapter "a"), transformers' model and PEFT's model with "a"."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("logprobs")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    peft_model = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), root / "a", seed=3, r=4,
                                   lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=4, max_model_len=128, max_loras=1, max_lora_rank=8,
                    lora_modules={"a": str(root / "a")})
    app = create_app(lambda metrics: build_service(conf, metrics))
    with TestClient(app) as client:
        wait_ready(client)
        yield client, hf, peft_model
    unwrap(peft_model)


def reference(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of every position's logits. # [S, V]"""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def post(client: TestClient, route: str, **body: Any) -> dict[str, Any]:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", [None, "a"])
def test_completion_logprobs_equal_the_reference(setup: tuple[TestClient, Any, Any], model: str | None) -> None:
    client, hf, peft_model = setup
    ref_model = hf if model is None else peft_model
    out = post(client, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
               echo=True, **({"model": model} if model else {}))
    lp = out["choices"][0]["logprobs"]
    tokens = len(PROMPT) + 6
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    generated = post(client, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                     **({"model": model} if model else {}))["choices"][0]["text"]
    assert out["choices"][0]["text"].endswith(generated)
    # the tokens: the prompt's, then the greedy ones
    ids = list(PROMPT)
    for _ in range(6):
        ref = reference(ref_model, ids)[-1]
        ids.append(int(ref.argmax()))
    ref = reference(ref_model, ids)  # [S, V]
    want = [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=ATOL)
    for p in range(1, len(ids)):  # the top 3 (plus the token itself) with their values
        top = lp["top_logprobs"][p]
        best = ref[p - 1].topk(3)
        assert len(top) in (3, 4)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(), abs=ATOL)
    offsets = lp["text_offset"]
    assert offsets == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(offsets))]


def test_echo_with_max_tokens_zero_scores_the_prompt(setup: tuple[TestClient, Any, Any]) -> None:
    client, hf, _ = setup
    out = post(client, "/v1/completions", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0
    ref = reference(hf, PROMPT)
    want = [ref[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))]
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=ATOL)
    # lm-evaluation-harness's loglikelihood: the sum over the continuation's tokens
    assert sum(choice["logprobs"]["token_logprobs"][4:]) == pytest.approx(sum(want[3:]), abs=1e-3)


def test_prompt_logprobs_in_vllms_shape_and_never_from_the_prefix_cache(setup: tuple[TestClient, Any, Any]) -> None:
    client, hf, _ = setup
    long_prompt = PROMPT * 5  # several blocks: a second run would hit the prefix cache
    ref = reference(hf, long_prompt)
    for _ in range(2):
        out = post(client, "/v1/completions", prompt=long_prompt, max_tokens=1, prompt_logprobs=2, temperature=0)
        scored = out["choices"][0]["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(long_prompt)
        for p in range(1, len(long_prompt)):
            entry = scored[p][str(long_prompt[p])]
            assert entry["logprob"] == pytest.approx(ref[p - 1, long_prompt[p]].item(), abs=ATOL)
            assert entry["rank"] == int((ref[p - 1] > ref[p - 1, long_prompt[p]]).sum()) + 1
            assert {int(t) for t, e in scored[p].items() if e["rank"] <= 2} == set(ref[p - 1].topk(2).indices.tolist())
    chat = post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                prompt_logprobs=0)
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])


def test_chat_logprobs_streamed_and_not(setup: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = setup
    body = {"messages": [{"role": "user", "content": "Write something"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2, "model": "a"}
    out = post(client, "/v1/chat/completions", **body)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    for entry in content:
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the best token
    assert "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
    streamed: list[dict[str, Any]] = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("content") or []
    assert streamed == content
    plain = post(client, "/v1/chat/completions", **{**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


def test_logprobs_are_the_same_alone_and_in_a_shared_batch(setup: tuple[TestClient, Any, Any]) -> None:
    client, _, _ = setup
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 5, "logprobs": 4, "model": "a"}
    alone = post(client, "/v1/completions", **body)["choices"][0]["logprobs"]
    others = [{"prompt": PROMPT[::-1] * (i + 1), "max_tokens": 12, "temperature": 1.0, "logprobs": 1,
               **({"model": "a"} if i % 2 else {})} for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, client, "/v1/completions", **b) for b in [*others[:2], body, others[2]]]
        shared = futures[2].result()["choices"][0]["logprobs"]
        for f in futures:
            f.result()
    assert shared == alone


def test_streamed_completion_logprobs_equal_the_whole_response(setup: tuple[TestClient, Any, Any]) -> None:
    """Echo included (its chunk waits for the prompt's logprobs), and tokens whose text is held
    back (a stop string's possible start) keep their logprobs."""
    client, _, _ = setup
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 2, "echo": True}
    whole = post(client, "/v1/completions", **body)["choices"][0]
    generated = whole["logprobs"]["tokens"][len(PROMPT):]
    stop = generated[4] + generated[5][:1]  # never completed unless token 5 starts with it: held back a while
    for extra in ({}, {"stop": [stop + "\u0000never"]}):
        merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = ""
        with client.stream("POST", "/v1/completions", json={**body, **extra, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                    text += choices[0]["text"]
                    for key in merged:
                        merged[key] += choices[0]["logprobs"][key]
        assert text == whole["text"]
        assert merged == whole["logprobs"]
