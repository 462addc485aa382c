"""End to end on an architecture without a native spec: a tiny GPT-NeoX (with the embedded
model's tokenizer) served transformers-backed by `--model-impl auto`, through the official
`openai` client: base and adapter completions equal transformers' and PEFT's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.adapters.helpers import make_peft_adapter
from tests.e2e.server_process import openai_client, running_server
from tests.server.families import hf_greedy, make_tiny_chat_llama

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


def test_gpt_neox_serves_base_and_adapter_like_transformers_and_peft(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_chat_llama(tmp_path / "neox", family="gpt-neox", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = {"neox": hf_greedy(reference, ids, 8)}
    peft_model = make_peft_adapter(reference, tmp_path / "ad", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    expected["ad"] = hf_greedy(peft_model, ids, 8)
    assert expected["neox"] != expected["ad"]  # the adapter changes the answer
    args = ["--model", str(folder), "--max-num-seqs", "4", "--max-model-len", "128", "--max-lora-rank", "8",
            "--lora-modules", f"ad={tmp_path / 'ad'}"]
    with httpx.Client(trust_env=False, timeout=120) as http, running_server(args, tmp_path, http) as server:
        info = http.get(f"{server.base_url}/admin/model").json()
        assert (info["model_type"], info["model_impl"]) == ("gpt_neox", "transformers")
        with openai_client(server) as api:
            for name, tokens in expected.items():
                answer = api.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                                extra_body={"ignore_eos": True})
                assert answer.choices[0].text == tokenizer.decode(tokens), name
