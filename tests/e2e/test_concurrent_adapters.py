"""48 concurrent streaming requests over 12 adapters on 4 slots, through the real server and the
official client: all succeed, each is token-identical to the same request sent alone, and every
slot reference is released afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from server.model_source import resolve_model
from tests.adapters.helpers import ALL_LINEAR, write_random_adapter
from tests.e2e.server_process import Server, running_server

pytestmark = pytest.mark.e2e

NUM_ADAPTERS = 12
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Count to three.", "Say hello."]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("adapters")
    base = resolve_model(None)
    target_sets = [["q_proj", "v_proj"], ALL_LINEAR, ["o_proj", "down_proj"], ["k_proj", "gate_proj", "up_proj"]]
    modules = [
        f"ad{i}="
        f"{write_random_adapter(root / f'ad{i}', base, rank=(4, 8, 16)[i % 3], targets=target_sets[i % 4], seed=i, scale=0.6)}"
        for i in range(NUM_ADAPTERS)
    ]
    args = ["--max-num-seqs", "16", "--max-model-len", "256", "--max-loras", "4", "--max-lora-rank", "16",
            "--lora-modules", *modules]
    with httpx.Client(trust_env=False) as http, running_server(args, tmp_path_factory.mktemp("srv"), http) as srv:
        yield srv


async def stream_chat(api: openai.AsyncOpenAI, adapter: str, question: str) -> tuple[str, int]:
    """Greedy streamed answer and its token count (from the usage chunk)."""
    stream = await api.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    text, tokens = [], -1
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


async def run_all(server: Server) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    http = httpx.AsyncClient(trust_env=False, timeout=300.0, limits=httpx.Limits(max_connections=64))
    async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, http_client=http) as api:
        jobs = [(f"ad{i % NUM_ADAPTERS}", QUESTIONS[i // NUM_ADAPTERS]) for i in range(4 * NUM_ADAPTERS)]
        together = await asyncio.gather(*(stream_chat(api, a, q) for a, q in jobs))
        alone = [await stream_chat(api, a, q) for a, q in jobs]
    return together, alone


def test_48_streams_over_12_adapters_on_4_slots(server: Server) -> None:
    together, alone = asyncio.run(run_all(server))
    assert len(together) == 48 and all(tokens == MAX_TOKENS for _, tokens in together)
    mismatched = [i for i, (t, a) in enumerate(zip(together, alone)) if t != a]
    assert not mismatched, [(together[i], alone[i]) for i in mismatched]
    # The adapters really differ: one question gets many different answers across them.
    assert len({text for text, _ in together[:NUM_ADAPTERS]}) >= NUM_ADAPTERS // 2

    with httpx.Client(trust_env=False) as http:
        stats = http.get(f"{server.base_url}/ready").json()
    slots = stats["slots"]
    assert slots["references"] == [0, 0, 0, 0] and stats["running"] == 0 and stats["waiting"] == 0
    assert slots["loads"] >= NUM_ADAPTERS and slots["evictions"] >= NUM_ADAPTERS - 4
