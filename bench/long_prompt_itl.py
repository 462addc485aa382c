"""Running streams' inter-token latency while long prompts arrive (the last target of issue 17).

One `loraswap serve` per row (embedded SmolLM2-135M, `--dtype float32 --max-num-seqs 32
--max-model-len 2048`, base model, no adapters, a temporary --data-dir), driven by the official
AsyncOpenAI client: streaming chat/completions, temperature 0, `ignore_eos`, usage in the last chunk.

1. 16 streams start at once, each STREAM_TOKENS tokens (default: enough to outlast the window below
   with room to spare, at least 128). Stream i asks for "a long, detailed essay of at least 2,000
   words" on one of the workload's questions (`stream_messages(i)`): with EOS ignored, a short
   answer would run on past <|im_end|> into <|im_start|> and other special tokens, which have no
   text, so the server sends no chunk for them and the next gap would span two steps;
2. once every stream has received READY_TOKENS (16) content chunks, 8 long prompts are sent, all at
   once (`--stagger-s S` sends long prompt j S x j seconds later instead): chat requests whose
   rendered prompt (the model's tokenizer and chat template, as the server encodes them) is exactly
   1,500 tokens: "Document j." and the workload's questions repeated from offset j (no two alike),
   LONG_MAX_TOKENS (8) tokens each. The prompt tokens the server counted are in the results;
3. the client takes the arrival time (time.perf_counter) of every content chunk of the 16 streams.

A gap is the time between two consecutive content chunks of one stream. The server sends one chunk
per engine event with text, i.e. per token, except for tokens without text (special tokens, part of
a UTF-8 character): their time merges into the next gap. So only the streams whose content chunks
equal their usage.completion_tokens are measured (`streams_measured`; the others keep running and
are listed in `streams_excluded`). Three sets of gaps, over the measured streams:
- before: gaps after all 16 streams had their first token and before the first long prompt was
  sent (16 rows decoding, nothing else);
- window: gaps overlapping [first long prompt sent, last long prompt's first token];
- whole:  every gap of the 16 streams.
Each gets p50, p99, max (ms; percentiles linearly interpolated) and p99 / p50. The target is the
window's p99 over the median gap before (the defaults row): the worst stalls of the running
streams while 12,000 prompt tokens are prefilled, against their steady gap. The window's own p99 /
p50 is reported too, but every step in the window carries prompt chunks, so its median is itself
slowed and that ratio would hide a uniform slowdown. Also reported: the long prompts' time to first
token (sent -> first content chunk), p50 and max. The client shares the cores with the server, so
gaps include the client's own scheduling.

Rows: "defaults" (the server's own --prefill-chunk and, where it has it, --max-num-batched-tokens)
and "budget N" (default 512): `--max-num-batched-tokens N` when `loraswap serve --help` lists it,
else `--prefill-chunk N` (a server without it prefills one chunk per step); `--budget-flags` sets
them, e.g. "--max-num-batched-tokens {n} --prefill-chunk {n}".

    .venv/bin/python bench/long_prompt_itl.py            # both rows: two server starts, ~4 min on 2 cores
    .venv/bin/python bench/long_prompt_itl.py --quick    # the defaults row only, ~1.5 min
    .venv/bin/python bench/long_prompt_itl.py --budget 0 --long-prompts 2 --long-tokens 300  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import QUESTIONS, model_dir, write  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from servers import free_port, serve  # noqa: E402
from targets import target_row  # noqa: E402

CACHE = ROOT / ".bench-cache"
LORASWAP = ROOT / ".venv" / "bin" / "loraswap"
BASE = "base"
SERVER_FLAGS = ["--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "2048"]
STREAMS = 16
LONG_PROMPTS = 8
LONG_TOKENS = 1500
LONG_MAX_TOKENS = 8
READY_TOKENS = 16
MIN_STREAM_TOKENS = 128
BUDGET = 512
READY_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 900.0
BUDGET_FLAG = "--max-num-batched-tokens"
# The workload's questions that make essays of 200+ tokens here (7, "Describe a cat in one
# sentence", ends early and then emits special tokens).
ESSAY_QUESTIONS = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 17]


def stream_messages(i: int) -> list[dict[str, str]]:
    """The i-th running stream's request: a long essay on one of the workload's questions."""
    question = QUESTIONS[ESSAY_QUESTIONS[i % len(ESSAY_QUESTIONS)]]
    return [{"role": "user", "content": f"Write a long, detailed essay of at least 2,000 words on this question: "
                                        f"{question}"}]


# ---- the server's flags ----------------------------------------------------------------------------
def serve_help() -> str:
    return subprocess.run([str(LORASWAP), "serve", "--help"], capture_output=True, text=True, timeout=120,
                          check=True, cwd=ROOT).stdout


def help_default(text: str, flag: str) -> int | None:
    """The "(default N)" of `flag` in `loraswap serve --help`, None when absent."""
    found = re.search(rf"{re.escape(flag)}\s+[A-Z_]+\s+(.*?)(?=\n\s*-|\Z)", text, re.S)
    number = found and re.search(r"default:?\s*(\d+)", found.group(1))
    return int(number.group(1)) if number else None


def budget_flags(template: str, n: int, help_text: str) -> list[str]:
    """The flags of the "budget N" row: `template` with {n}, or "auto" (see the module docstring)."""
    if template == "auto":
        template = f"{BUDGET_FLAG} {{n}}" if BUDGET_FLAG in help_text else "--prefill-chunk {n}"
    return shlex.split(template.format(n=n))


def step_prompt_tokens(flags: list[str], help_text: str) -> int:
    """Prompt tokens one engine step takes at most with `flags` (to size the streams)."""
    values = [int(flags[i + 1]) for i, f in enumerate(flags[:-1]) if f in (BUDGET_FLAG, "--prefill-chunk")]
    values += [v for f in (BUDGET_FLAG, "--prefill-chunk") if f not in flags
               for v in [help_default(help_text, f)] if v is not None]
    return max(16, min(values, default=512))


# ---- the long prompts ---------------------------------------------------------------------------
def long_messages(tok: Any, j: int, length: int) -> list[dict[str, str]]:
    """A chat request whose rendered prompt is `length` tokens: "Document j." then the questions from
    offset j, as many words as fit, padded with " x" (one token each) to the exact length."""
    words = " ".join(QUESTIONS[(j + k) % len(QUESTIONS)] for k in range(length)).split()

    def build(n: int, pad: int = 0) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Document {j}. " + " ".join(words[:n]) + " x" * pad}]

    def count(msgs: list[dict[str, str]]) -> int:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return len(tok.encode(text, add_special_tokens=False))

    lo, hi = 0, len(words)  # the most words with count <= length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid - 1)
    pad = length - count(build(lo))
    for _ in range(8):
        got = count(build(lo, pad))
        if got == length:
            return build(lo, pad)
        pad += length - got
    raise RuntimeError(f"cannot build a prompt of exactly {length} tokens (document {j})")


# ---- the load -----------------------------------------------------------------------------------
async def stream(client: AsyncOpenAI, msgs: list[dict[str, str]], max_tokens: int, times: list[float],
                 on_chunk: Callable[[], None] | None = None) -> dict[str, Any]:
    """One streaming chat request; appends each content chunk's arrival time to `times`."""
    sent = time.perf_counter()
    response = await client.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=max_tokens, temperature=0.0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    async for chunk in response:
        if chunk.usage is not None:
            usage = chunk.usage
        if any(c.delta and c.delta.content for c in chunk.choices):
            times.append(time.perf_counter())
            if on_chunk is not None:
                on_chunk()
    return {"sent": sent, "times": times, "chunks": len(times),
            "tokens": usage.completion_tokens if usage else None, "prompt_tokens": usage.prompt_tokens if usage else None}


async def scenario(url: str, streams: int, stream_tokens: int, ready_tokens: int, longs: list[list[dict[str, str]]],
                   long_max_tokens: int, stagger_s: float) -> dict[str, Any]:
    """Steps 1-3 of the module docstring: the streams' and long prompts' results, and when the long
    prompts were first sent."""
    client = AsyncOpenAI(base_url=url, api_key="EMPTY", timeout=RUN_TIMEOUT_S, max_retries=0)
    times: list[list[float]] = [[] for _ in range(streams)]
    ready = asyncio.Event()

    def check() -> None:
        if all(len(t) >= ready_tokens for t in times):
            ready.set()

    async def long(j: int) -> dict[str, Any]:
        await asyncio.sleep(j * stagger_s)
        return await stream(client, longs[j], long_max_tokens, [])

    tasks = [asyncio.create_task(stream(client, stream_messages(i), stream_tokens, times[i], check))
             for i in range(streams)]
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=RUN_TIMEOUT_S)
        if not ready.is_set():
            failed = [t.exception() for t in tasks if t.done() and t.exception()]
            raise RuntimeError(f"the streams never all reached {ready_tokens} tokens: {failed or 'timeout'}")
        long_start = time.perf_counter()
        long_tasks = [asyncio.create_task(long(j)) for j in range(len(longs))]
        tasks += long_tasks
        results = await asyncio.gather(*tasks)
    finally:
        for t in [waiter, *tasks]:
            t.cancel()
        await client.close()
    return {"streams": results[:streams], "longs": results[streams:], "long_start": long_start}


# ---- the numbers ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    f = math.floor(k)
    return s[f] + (s[min(f + 1, len(s) - 1)] - s[f]) * (k - f)


def gap_stats(gaps: list[float]) -> dict[str, Any]:
    if not gaps:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "p99_vs_p50": None}
    p50, p99 = percentile(gaps, 0.5), percentile(gaps, 0.99)
    return {"count": len(gaps), "p50_ms": round(p50 * 1e3, 1), "p99_ms": round(p99 * 1e3, 1),
            "max_ms": round(max(gaps) * 1e3, 1), "p99_vs_p50": round(p99 / p50, 2) if p50 > 0 else None}


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    """The gap sets (before, window, whole) of the measured streams and the long prompts' TTFT."""
    all_first = max(s["times"][0] for s in run["streams"])
    measured = [i for i, s in enumerate(run["streams"]) if s["tokens"] == s["chunks"]]
    if not measured:
        raise RuntimeError("every stream had tokens without text (see the module docstring)")
    times = [run["streams"][i]["times"] for i in measured]
    start = run["long_start"]
    firsts = [r["times"][0] for r in run["longs"] if r["times"]]
    if len(firsts) != len(run["longs"]):
        raise RuntimeError("a long prompt returned no text")
    end = max(firsts)
    pairs = [(a, b) for t in times for a, b in zip(t, t[1:])]
    before = [b - a for a, b in pairs if a >= all_first and b <= start]
    window = [b - a for a, b in pairs if b > start and a < end]
    ttfts = [r["times"][0] - r["sent"] for r in run["longs"]]
    stats = {"before": gap_stats(before), "window": gap_stats(window), "whole": gap_stats([b - a for a, b in pairs])}
    steady = stats["before"]["p50_ms"]
    return {
        **stats,
        "p99_window_vs_p50_before": round(stats["window"]["p99_ms"] / steady, 2) if steady and window else None,
        "window_s": round(end - start, 2),
        "covered": all(t[-1] > end for t in times),  # every stream still decoding when the window closed
        "long_ttft_p50_s": round(percentile(ttfts, 0.5), 2), "long_ttft_max_s": round(max(ttfts), 2),
        "long_ttfts_s": [round(t, 2) for t in ttfts],
        "long_prompt_tokens": sorted({r["prompt_tokens"] for r in run["longs"]}),
        "stream_tokens": [s["tokens"] for s in run["streams"]],
        "streams_measured": len(measured),
        "streams_excluded": {i: f"{s['tokens']} tokens in {s['chunks']} chunks" for i, s in enumerate(run["streams"])
                             if i not in measured},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the defaults row only (one server start)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_prompt_itl.json")
    ap.add_argument("--budget", type=int, default=BUDGET, help="the second row's step budget; 0: no second row")
    ap.add_argument("--budget-flags", default="auto", help='flags of the second row, {n} = --budget (default "auto")')
    ap.add_argument("--server-flags", default="", help="extra `loraswap serve` flags of every row")
    ap.add_argument("--streams", type=int, default=STREAMS)
    ap.add_argument("--stream-tokens", type=int, default=0, help="tokens per stream (default: auto, see the docstring)")
    ap.add_argument("--ready-tokens", type=int, default=READY_TOKENS)
    ap.add_argument("--long-prompts", type=int, default=LONG_PROMPTS)
    ap.add_argument("--long-tokens", type=int, default=LONG_TOKENS)
    ap.add_argument("--long-max-tokens", type=int, default=LONG_MAX_TOKENS)
    ap.add_argument("--stagger-s", type=float, default=0.0, help="seconds between long prompts (default: all at once)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the server (default: torch's default, all cores); on a machine shared "
                         "with other jobs, 1 avoids the stalls of oversubscribed OpenMP barriers")
    args = ap.parse_args()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server is stopped

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    longs = [long_messages(tok, j, args.long_tokens) for j in range(args.long_prompts)]
    help_text = serve_help()
    extra = shlex.split(args.server_flags)
    configs = [("defaults", extra)]
    if args.budget and not args.quick:
        configs.append((f"budget {args.budget}", [*extra, *budget_flags(args.budget_flags, args.budget, help_text)]))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="long_prompt_itl_") as tmp:
        for label, flags in configs:
            steps = math.ceil(args.long_prompts * args.long_tokens / step_prompt_tokens(flags, help_text))
            tokens = args.stream_tokens or max(MIN_STREAM_TOKENS, args.ready_tokens + 2 * steps + 32)
            port = free_port()
            slug = label.replace(" ", "_")
            cmd = [str(LORASWAP), "serve", "--port", str(port), "--served-model-name", BASE, *SERVER_FLAGS, *flags,
                   "--data-dir", str(Path(tmp) / slug)]
            with serve(f"loraswap ({label})", cmd, port, "/ready", CACHE / "logs" / f"long_prompt_itl_{slug}.log",
                       env=env, timeout=READY_TIMEOUT_S) as srv:
                asyncio.run(scenario(srv["url"], 2, 4, 1, [], 1, 0.0))  # warm-up: two short requests
                run = asyncio.run(scenario(srv["url"], args.streams, tokens, args.ready_tokens, longs,
                                           args.long_max_tokens, args.stagger_s))
            row = {"label": label, "flags": " ".join(flags), "streams": args.streams, "stream_max_tokens": tokens,
                   "long_prompts": args.long_prompts, "startup_s": srv["startup_s"], **analyse(run)}
            rows.append(row)
            w = row["window"]
            print(f"  {label}: gap p50 before {row['before']['p50_ms']} ms; window {row['window_s']} s: p50 "
                  f"{w['p50_ms']} p99 {w['p99_ms']} max {w['max_ms']} ms, p99 / p50 before "
                  f"{row['p99_window_vs_p50_before']}, p99 / p50 {w['p99_vs_p50']}; long TTFT p50 "
                  f"{row['long_ttft_p50_s']} s max {row['long_ttft_max_s']} s", flush=True)
            if row["streams_excluded"]:
                print(f"  {label}: streams with tokens without text, not measured: {row['streams_excluded']}",
                      flush=True)
            if not row["covered"]:
                print(f"  !! {label}: a stream ended before the window closed (raise --stream-tokens)", flush=True)

    first = rows[0]
    value = first["p99_window_vs_p50_before"] if first["covered"] else None
    why = {} if first["covered"] else {"why": "a stream ended before the window closed; raise --stream-tokens"}
    metric = (f"{args.streams} streams decoding while {args.long_prompts} prompts of {args.long_tokens:,} tokens arrive "
              "(server defaults): inter-token gap p99 in the window / median gap before")
    summary = {
        "streams": args.streams, "long_prompts": args.long_prompts, "long_prompt_tokens": args.long_tokens,
        "arrival": "at once" if not args.stagger_s else f"staggered by {args.stagger_s} s",
        "server_defaults": {f: help_default(help_text, f) for f in ("--prefill-chunk", BUDGET_FLAG)},
        "server_has_budget_flag": BUDGET_FLAG in help_text,
        "p99_window_vs_p50_before": {r["label"]: r["p99_window_vs_p50_before"] for r in rows},
        "long_ttft_p50_s": {r["label"]: r["long_ttft_p50_s"] for r in rows},
        "targets": [target_row("long_prompt_itl_p99_vs_median", value, metric, **why)],
        "total_s": round(time.perf_counter() - t0, 1),
    }
    write(args.out, "long_prompt_itl", rows, summary, quick=args.quick, server_flags=" ".join(SERVER_FLAGS),
          loadavg_start=load_start, loadavg_end=os.getloadavg(), threads_flag=args.threads)
    print(json.dumps({k: summary[k] for k in ("p99_window_vs_p50_before", "long_ttft_p50_s", "targets")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
