"""One closed burst of concurrent chat requests against any OpenAI-compatible server.

The same client drives every system compared by `make bench` (vLLM, loraswap's own server, the
transformers + PEFT baseline), so the numbers differ only by the server:

    from openai_load import run_load
    r = run_load("http://127.0.0.1:8000/v1", ["ad0", "ad1", "base", ...], max_tokens=64)
    r["tok_s"], r["ttft_p50_s"], r["exact"]

Request i sends `common.messages(i)` to model `models[i]`; all len(models) requests start at once
(or, with `concurrency=C`, a closed loop: requests 0..C-1 start at once and each one that ends lets
the next one in index order start, so at most C are in flight). Streaming, temperature 0,
`ignore_eos: true` in the body so every request generates exactly max_tokens tokens. Token
counts come from the final usage chunk (`stream_options.include_usage`); a server that sends no
usage falls back to counting content chunks (`"usage": false` in the result, less exact). Runs in the project venv: it only needs the `openai` package.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from common import messages
from openai import AsyncOpenAI


async def _one(client: AsyncOpenAI, i: int, model: str, max_tokens: int, extra_body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = first_any = None
    chunks = 0
    usage = None
    text = []
    stream = await client.chat.completions.create(
        model=model, messages=messages(i), max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra_body)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            now = time.perf_counter()
            first_any = first_any or now
            if choice.delta and choice.delta.content:
                first = first or now
                chunks += 1
                text.append(choice.delta.content)
    end = time.perf_counter()
    ttft = (first or first_any or end) - start
    tokens = usage.completion_tokens if usage is not None else chunks
    return {"model": model, "tokens": tokens, "usage": usage is not None, "ttft_s": ttft,
            "latency_s": end - start, "text": "".join(text)}


async def run_load_async(base_url: str, models: list[str], max_tokens: int, api_key: str | None = None, *,
                         extra_body: dict[str, Any] | None = None, timeout: float = 900.0,
                         concurrency: int | None = None) -> dict[str, Any]:
    """Async form of `run_load` (same arguments and result)."""
    body = {"ignore_eos": True} if extra_body is None else extra_body
    client = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)
    # Waiters on an asyncio.Semaphore are woken first in, first out, and the coroutines below reach
    # it in index order, so request i starts before request i+1.
    gate = asyncio.Semaphore(concurrency or len(models))

    async def limited(i: int, model: str) -> dict[str, Any]:
        async with gate:
            return await _one(client, i, model, max_tokens, body)

    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i, m) for i, m in enumerate(models)))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    tokens = [r["tokens"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    total = sum(tokens)
    return {
        "requests": len(results),
        "concurrency": min(concurrency or len(models), len(models)),
        "max_tokens": max_tokens,
        "completion_tokens": total,
        "wall_s": round(wall, 3),
        "tok_s": round(total / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
        "latency_max_s": round(max(r["latency_s"] for r in results), 3),
        "tokens": tokens,
        "exact": all(t == max_tokens for t in tokens),
        "usage": all(r["usage"] for r in results),
        "sample": results[0]["text"][:200],
    }


def run_load(base_url: str, models: list[str], max_tokens: int, api_key: str | None = None, *,
             extra_body: dict[str, Any] | None = None, timeout: float = 900.0,
             concurrency: int | None = None) -> dict[str, Any]:
    """Send len(models) chat requests at once (request i: `messages(i)` to `models[i]`) and wait for all.

    base_url: the server's OpenAI root, e.g. "http://127.0.0.1:8000/v1".
    models:   one model name per request ("base" / an adapter name); its length is the concurrency.
    max_tokens: tokens to generate per request (EOS ignored, so each should return exactly this many).
    api_key:  bearer token if the server wants one.
    extra_body: extra JSON fields of every request; default {"ignore_eos": True}.
    concurrency: at most this many requests in flight (a closed loop in index order); default all.

    Returns a dict: requests, concurrency, max_tokens, completion_tokens (sum of usage.completion_tokens),
    wall_s (first request sent -> last stream closed), tok_s = completion_tokens / wall_s,
    ttft_p50_s / ttft_max_s (send -> first content chunk), latency_max_s, tokens (per request),
    exact (every request returned exactly max_tokens tokens), usage (server sent usage),
    sample (start of request 0's text). Raises on any failed request.
    """
    return asyncio.run(run_load_async(base_url, models, max_tokens, api_key, extra_body=extra_body,
                                      timeout=timeout, concurrency=concurrency))
