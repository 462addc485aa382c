"""The paged KV cache against fixed KV rows, and prefix caching on against off (issue 18).

Every server is `python -m server serve` on the embedded SmolLM2-135M-Instruct in float32, on a free
loopback port, driven by the official AsyncOpenAI client (streaming chat, temperature 0,
`ignore_eos`). "static rows" is commit STATIC_COMMIT, the last one whose KV cache was a fixed row of
`--max-model-len` positions per sequence, checked out as a git worktree under .bench-cache and run
with the same virtualenv: the comparison is against the code as it was, not a mode of today's.

A. Requests in flight for the same memory. 8 static rows of 2,048 positions (755 MB of KV) against
   the paged server given the same bytes (`--kv-cache-memory`) and `--max-num-seqs 64`. The mix:
   56 short chats (the workload's questions) and 8 long ones (a 1,500-token document each), all
   sent at once, SHORT_TOKENS new tokens each. /ready is polled every 0.25 s for `running`; reported:
   the peak and the mean over the run, wall time, tok/s, and the paged server's preemptions.
B. Time to first token with a shared 1,000-token system prompt per adapter: adapters ad0 and ad1,
   each with its own system prompt; per adapter one request, then WARM_REQUESTS more with other
   questions, one at a time. TTFT of the later ones (the first of each adapter fills the cache),
   median, prefix caching on against `--no-enable-prefix-caching` (target: <= 0.2x).
C. Throughput on the 32-request workload (bench/common.py, 32 chats at once, NEW_TOKENS each,
   `--max-num-seqs 32 --max-model-len 256`): paged (prefix caching on, the default, and off)
   against static rows, each measured ROUNDS times alternately; ratio of the medians (target: no
   loss, >= 0.98x).

    .venv/bin/python bench/kv_paging.py           # ~10 min on 2 cores
    .venv/bin/python bench/kv_paging.py --quick   # fewer requests and tokens, ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import NEW_TOKENS, QUESTIONS, make_adapters, messages, model_dir, write  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from openai_load import run_load  # noqa: E402
from servers import free_port, serve  # noqa: E402

STATIC_COMMIT = "119d54e"
CACHE = ROOT / ".bench-cache"
PYTHON = ROOT / ".venv" / "bin" / "python"
STATIC_ROWS, LONG_LEN = 8, 2048
SHORT_TOKENS = 32
SYSTEM_TOKENS = 1_000
WARM_REQUESTS = 3
ROUNDS = 2


def static_tree() -> Path:
    """A worktree of STATIC_COMMIT (made once)."""
    tree = CACHE / f"static-rows-{STATIC_COMMIT}"
    if not (tree / "server").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), STATIC_COMMIT],
                       check=True)
    return tree


@contextmanager
def server(label: str, flags: list[str], data: Path, *, cwd: Path | None = None,
           adapters: dict[str, Path] | None = None) -> Iterator[str]:
    port = free_port()
    command = [str(PYTHON), "-m", "server", "serve", "--port", str(port), "--served-model-name", "base",
               "--data-dir", str(data / label), *flags]
    if adapters:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    with serve(label, command, port, "/ready", CACHE / "logs" / f"kv_paging_{label}.log", timeout=300, cwd=cwd) as srv:
        yield srv["url"]


def ready(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/ready", timeout=10) as r:
        return json.loads(r.read())


def kv_bytes_per_position() -> int:
    """What one cached position of the embedded model takes in float32 (46,080 bytes)."""
    from server.kv_cache import kv_bytes_per_token
    from server.model_config import load_model_config

    cfg = load_model_config(model_dir())
    return kv_bytes_per_token(num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                              head_dim=cfg.head_dim, dtype_bytes=4)


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def document(tok: Any, tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens: the workload's questions, from offset `seed`, repeated."""
    words, text = [], ""
    i = seed
    while len(tok(text)["input_ids"]) < tokens:
        words.append(QUESTIONS[i % len(QUESTIONS)])
        i += 1
        text = f"Document {seed}. " + " ".join(words)
    return text


async def chat(client: AsyncOpenAI, model: str, msgs: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=msgs, max_tokens=max_tokens, temperature=0.0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if first is None and any(c.delta and c.delta.content for c in chunk.choices):
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "tokens": tokens, "end": end}


def in_flight(url: str, jobs: list[tuple[str, list[dict[str, str]], int]]) -> dict[str, Any]:
    """Send every job at once; sample /ready's `running` meanwhile."""
    samples: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            samples.append(int(ready(url)["running"]))
            done.wait(0.25)

    async def go() -> list[dict[str, float]]:
        client = AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=1800, max_retries=0)
        try:
            return await asyncio.gather(*(chat(client, m, msgs, n) for m, msgs, n in jobs))
        finally:
            await client.close()

    poller = threading.Thread(target=poll, daemon=True)
    start = time.perf_counter()
    poller.start()
    results = asyncio.run(go())
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    tokens = sum(r["tokens"] for r in results)
    kv = ready(url).get("kv_cache", {})
    return {"requests": len(jobs), "peak_running": max(samples), "mean_running": round(statistics.mean(samples), 2),
            "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2), "completion_tokens": tokens,
            "preemptions": kv.get("preemptions")}


def part_a(data: Path, tok: Any, quick: bool) -> dict[str, Any]:
    shorts, longs = (24, 4) if quick else (56, 8)
    jobs = [("base", messages(i), SHORT_TOKENS) for i in range(shorts)]
    jobs += [("base", [{"role": "user", "content": document(tok, 1_500, j) + "\nSummarize it."}], SHORT_TOKENS)
             for j in range(longs)]
    jobs.sort(key=lambda job: hash(str(job[1])) % 7)  # the long ones spread among the short ones
    memory = STATIC_ROWS * LONG_LEN * kv_bytes_per_position()
    out: dict[str, Any] = {"kv_bytes": memory, "short": shorts, "long": longs, "new_tokens": SHORT_TOKENS}
    static_flags = ["--max-num-seqs", str(STATIC_ROWS), "--max-model-len", str(LONG_LEN)]
    with server("static_rows_a", static_flags, data, cwd=static_tree()) as url:
        out["static_rows"] = in_flight(url, jobs)
    paged_flags = ["--max-num-seqs", "64", "--max-model-len", str(LONG_LEN), "--kv-cache-memory", str(memory)]
    with server("paged_a", paged_flags, data) as url:
        out["paged"] = in_flight(url, jobs)
    out["peak_in_flight_ratio"] = round(out["paged"]["peak_running"] / out["static_rows"]["peak_running"], 2)
    out["tok_s_ratio"] = round(out["paged"]["tok_s"] / out["static_rows"]["tok_s"], 3)
    return out


def ttfts(url: str, tok: Any, warm: int) -> list[float]:
    async def go() -> list[float]:
        client = AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=600, max_retries=0)
        got = []
        try:
            for a, adapter in enumerate(("ad0", "ad1")):
                system = {"role": "system", "content": document(tok, SYSTEM_TOKENS, 100 + a)}
                for q in range(warm + 1):
                    r = await chat(client, adapter, [system, *messages(q + 5 * a)], 4)
                    if q:  # the first request of each adapter fills the cache
                        got.append(r["ttft_s"])
        finally:
            await client.close()
        return got

    return asyncio.run(go())


def part_b(data: Path, tok: Any, adapters: dict[str, Path], quick: bool) -> dict[str, Any]:
    warm = 2 if quick else WARM_REQUESTS
    flags = ["--max-num-seqs", "8", "--max-model-len", str(LONG_LEN), "--max-loras", "4", "--max-lora-rank", "16"]
    out: dict[str, Any] = {"system_prompt_tokens": SYSTEM_TOKENS, "adapters": 2, "warm_requests_per_adapter": warm}
    for label, extra in (("prefix_on", []), ("prefix_off", ["--no-enable-prefix-caching"])):
        with server(label, flags + extra, data, adapters=adapters) as url:
            times = ttfts(url, tok, warm)
            kv = ready(url)["kv_cache"]
        out[label] = {"ttft_median_s": round(statistics.median(times), 3), "ttft_s": [round(t, 3) for t in times],
                      "prefix_cache_hits": kv["prefix_cache_hits"], "prefix_cache_queries": kv["prefix_cache_queries"]}
    out["ttft_ratio"] = round(out["prefix_on"]["ttft_median_s"] / out["prefix_off"]["ttft_median_s"], 3)
    out["target"] = "<= 0.2"
    return out


def part_c(data: Path, quick: bool) -> dict[str, Any]:
    requests, tokens = (16, 16) if quick else (32, NEW_TOKENS)
    flags = ["--max-num-seqs", "32", "--max-model-len", "256"]
    runs: dict[str, list[float]] = {"static_rows": [], "paged": [], "paged_no_prefix": []}
    with (server("static_rows_c", flags, data, cwd=static_tree()) as static_url,
          server("paged_c", flags, data) as paged_url,
          server("paged_no_prefix_c", flags + ["--no-enable-prefix-caching"], data) as off_url):
        urls = {"static_rows": static_url, "paged": paged_url, "paged_no_prefix": off_url}
        for url in urls.values():
            run_load(url, ["base"] * 4, 4)  # warm-up
        for _ in range(ROUNDS):
            for label, url in urls.items():
                r = run_load(url, ["base"] * requests, tokens)
                if not r["exact"]:
                    raise RuntimeError(f"{label}: not every request returned {tokens} tokens")
                runs[label].append(r["tok_s"])
                print(f"  {label}: {r['tok_s']} tok/s", flush=True)
    med = {label: statistics.median(v) for label, v in runs.items()}
    return {"requests": requests, "new_tokens": tokens, "rounds": ROUNDS, "tok_s": runs,
            "paged_vs_static": round(med["paged"] / med["static_rows"], 3),
            "paged_no_prefix_vs_static": round(med["paged_no_prefix"] / med["static_rows"], 3), "target": ">= 0.98"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_paging.json")
    args = ap.parse_args()
    start = time.perf_counter()
    tok = tokenizer()
    adapters = {name: path for name, path in make_adapters(CACHE / "adapters", 2).items()}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kv_paging_") as tmp:
        data = Path(tmp)
        if "c" in args.parts:
            result["c_throughput"] = part_c(data, args.quick)
            print(json.dumps(result["c_throughput"]), flush=True)
        if "b" in args.parts:
            result["b_prefix_ttft"] = part_b(data, tok, adapters, args.quick)
            print(json.dumps(result["b_prefix_ttft"]), flush=True)
        if "a" in args.parts:
            result["a_in_flight"] = part_a(data, tok, args.quick)
            print(json.dumps(result["a_in_flight"]), flush=True)
    summary = {k: v for part in result.values() if isinstance(part, dict) for k, v in part.items()
               if k.endswith("ratio") or k.endswith("_vs_static")}
    write(args.out, "kv_paging", [], summary, quick=args.quick, static_commit=STATIC_COMMIT,
          wall_s=round(time.perf_counter() - start, 1), **{k: v for k, v in result.items() if isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
