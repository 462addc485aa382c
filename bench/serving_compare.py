"""Serving many adapters: loraswap against what a user would otherwise build with transformers + PEFT.

The shared workload (bench/common.py): the embedded SmolLM2-135M-Instruct in float32, 32 chat
requests at once (request i: `messages(i)`), greedy, EOS ignored, NEW_TOKENS tokens each; random
rank-16 adapters on all linear layers (.bench-cache/adapters). Every HTTP system is a subprocess on a
free loopback port, driven by the same client (bench/openai_load.py: the official AsyncOpenAI
client, streaming), warmed up first (one 4-token request to the base model and one to each of
ad0..ad7), and stopped with SIGTERM (SIGKILL after a grace period), also on errors; it dies with
this script (bench/servers.py).

  a. peft_switching:   bench/peft_server.py, the PEFT-guide server: 8 adapters loaded with
                       `load_adapter`, one request at a time, `set_adapter(X)` + `generate`
                       (requests ad{i % 8}; the first 16 of the 32, 4 in --quick: it serves
                       one at a time, so its tok/s does not depend on how many wait);
  b. peft_mixed_batch: PEFT's mixed-adapter batch in this process: one `generate(**batch,
                       adapter_names=[...])` over the 32 left-padded prompts (rows ad{i % 8});
                       no server and no streaming, so no time to first token;
  c. loraswap_base:    `loraswap serve --max-num-seqs 32 --max-model-len 256 --max-loras 8
                       --max-lora-rank 16` with the 8 adapters registered, requests to the base model;
  d. loraswap_8:       the same server, requests ad{i % 8} (the headline);
  e. loraswap_64_distinct: a second loraswap server, the same flags but `--max-loras 64` (explicit,
                       not `auto`), the 64 adapters ad0..ad63 registered and all 64 warmed up (one
                       4-token request each, so the timed run loads none). The load generator sends
                       64 requests, request i to ad{i % 64} (every adapter exactly once), as a
                       closed loop with as many in flight as (c) has (32; 16 in --quick): the first
                       32 start at once and each one that ends lets the next start, so with equal
                       lengths this is two waves of 32 requests on 32 different adapters each.
                       tok/s = all 64 x tokens / wall of the whole loop, divided by (c)'s;
  f. loraswap_32_on_8: only with --thrash: 32 adapters registered on 8 slots, requests ad{i % 32}
                       (swaps and waits; a third server start).

vLLM (CPU) is bench/vllm_baseline.py; its rows have the same fields (`point`, `models`, and
run_load's fields) so the files can be merged. Ratios are of tokens/s within this one run:
`vs_loraswap_base` (c) and `vs_peft_switching` (a). Targets (bench/targets.py): d >= 0.95x c,
e >= 0.85x c, and (not keyed) d >= 10x a.

    .venv/bin/python bench/serving_compare.py --quick   # 16 requests of 16 tokens; (a) 4 of them; ~2.5 min
    .venv/bin/python bench/serving_compare.py           # 64 tokens, 32 requests (16 for (a)); ~8 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import (
    NEW_TOKENS,
    QUICK_NEW_TOKENS,
    make_adapters,
    messages,
    model_dir,
    write,
)
from openai_load import run_load
from servers import free_port, serve
from targets import target_row

CACHE = ROOT / ".bench-cache"
LOGS = CACHE / "logs"
BASE = "base"
REQUESTS = 32
ADAPTERS = 8
THRASH_ADAPTERS = 32
DISTINCT_ADAPTERS = 64  # (e): adapters, slots and requests
QUICK_REQUESTS = 16  # --quick: a burst of 16 (the server keeps 32 rows)
QUICK_PEFT_REQUESTS = 4
# It serves one request at a time, so its tok/s does not depend on how many wait; half the burst keeps
# `make bench` under 20 minutes (all 32 took 274 s of a 21-minute run).
FULL_PEFT_REQUESTS = 16
SERVER_ENV = dict(os.environ)  # --threads adds OMP_NUM_THREADS
READY_TIMEOUT_S = 300.0
LORASWAP = ROOT / ".venv" / "bin" / "loraswap"
LORASWAP_FLAGS = ["--max-num-seqs", str(REQUESTS), "--max-model-len", "256", "--max-loras", str(ADAPTERS),
                  "--max-lora-rank", "16"]


def with_slots(flags: list[str], slots: int) -> list[str]:
    """`flags` with the value of --max-loras replaced by `slots`."""
    out = list(flags)
    out[out.index("--max-loras") + 1] = str(slots)
    return out


def loraswap_cmd(port: int, data_dir: Path, adapters: dict[str, Path], flags: list[str] = LORASWAP_FLAGS) -> list[str]:
    """`loraswap serve` on `port` with `flags` (default LORASWAP_FLAGS) and `adapters` registered."""
    return [str(LORASWAP), "serve", "--port", str(port), "--served-model-name", BASE, *flags,
            "--data-dir", str(data_dir), *modules(adapters)]


def modules(chosen: dict[str, Path]) -> list[str]:
    return ["--lora-modules", *(f"{name}={path}" for name, path in chosen.items())]


def warm_up(url: str, adapters: int = ADAPTERS) -> None:
    """One short request to the base model and one to each of ad0..ad{adapters-1} (loads them where
    needed), all at once (the server queues what does not fit its rows)."""
    run_load(url, [BASE] + [f"ad{i}" for i in range(adapters)], 4)


def measure(system: str, point: str, url: str, models: list[str], max_tokens: int, *,
            concurrency: int | None = None, **extra: Any) -> dict[str, Any]:
    r = run_load(url, models, max_tokens, concurrency=concurrency)
    row = {"system": system, "point": point, "models": sorted(set(models), key=lambda m: (len(m), m)),
           **{k: v for k, v in r.items() if k != "tokens"}, **extra}
    report(row)
    if not r["exact"]:
        raise RuntimeError(f"{point}: requests did not all return {max_tokens} tokens: {r['tokens']}")
    return row


def report(row: dict[str, Any]) -> None:
    ttft = "" if row.get("ttft_p50_s") is None else f"  TTFT p50 {row['ttft_p50_s']:.2f} s max {row['ttft_max_s']:.2f} s"
    flight = f", {row['concurrency']} in flight" if row.get("concurrency", row["requests"]) != row["requests"] else ""
    print(f"  {row['point']:17s} {row['tok_s']:8.2f} tok/s  wall {row['wall_s']:.1f} s{ttft}  "
          f"tokens {row['completion_tokens']} ({row['requests']} requests{flight})", flush=True)


def peft_mixed_batch(adapters: dict[str, Path], max_tokens: int, requests: int) -> dict[str, Any]:
    """(b): PEFT's mixed-adapter batch, one `generate` over all `requests` left-padded prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("loading transformers + PEFT in process for the mixed batch", flush=True)
    start = time.perf_counter()
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    items = list(adapters.items())
    model = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    texts = [tokenizer.apply_chat_template(messages(i), tokenize=False, add_generation_prompt=True)
             for i in range(requests)]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    names = [f"ad{i % ADAPTERS}" for i in range(requests)]
    load_s = time.perf_counter() - start

    def generate(tokens: int, model: Any = model) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**batch, adapter_names=names, max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=pad_id)

    generate(2)  # warm-up: the first call pays one-time costs
    start = time.perf_counter()
    out = generate(max_tokens)
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    tokens = [int(row.numel()) for row in new]
    total = sum(tokens)
    row = {
        "system": "peft-generate", "point": "peft_mixed_batch", "models": sorted(set(names), key=lambda m: (len(m), m)),
        "requests": requests, "max_tokens": max_tokens, "completion_tokens": total, "wall_s": round(wall, 3),
        "tok_s": round(total / wall, 2), "ttft_p50_s": None, "ttft_max_s": None, "latency_max_s": round(wall, 3),
        "exact": all(t == max_tokens for t in tokens), "usage": None,
        "sample": tokenizer.decode(new[0], skip_special_tokens=True)[:200], "startup_s": round(load_s, 1),
        "note": f"in process, one generate(adapter_names=...) over {requests} left-padded rows (batch padded to "
                f"{batch['input_ids'].shape[1]} prompt tokens); no HTTP and no streaming, so no TTFT",
    }
    report(row)
    del model, generate, out
    gc.collect()
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_REQUESTS} requests of {QUICK_NEW_TOKENS} tokens ({QUICK_REQUESTS} in flight for "
                         f"(e)); the PEFT-switching server gets {QUICK_PEFT_REQUESTS} of them")
    ap.add_argument("--thrash", action="store_true", help="also (f): 32 adapters on 8 slots (a third server start)")
    ap.add_argument("--only-loraswap", action="store_true", help="skip (a) and (b), the PEFT baselines")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help=f"tokens per request (default {NEW_TOKENS}; {QUICK_NEW_TOKENS} with --quick)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving_compare.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every system (OMP_NUM_THREADS of the servers, torch.set_num_threads "
                         "here); default: torch's default (all cores). On a machine shared with other jobs, 1 "
                         "avoids the stalls of oversubscribed OpenMP barriers")
    args = ap.parse_args()
    if args.threads:
        import torch

        SERVER_ENV["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    # A SIGTERM (from run_all, make or a person) unwinds normally, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else NEW_TOKENS)
    all_adapters = make_adapters(CACHE / "adapters", max(THRASH_ADAPTERS, DISTINCT_ADAPTERS))
    adapters = {f"ad{i}": all_adapters[f"ad{i}"] for i in range(ADAPTERS)}
    thrash = {f"ad{i}": all_adapters[f"ad{i}"] for i in range(THRASH_ADAPTERS)}
    distinct = {f"ad{i}": all_adapters[f"ad{i}"] for i in range(DISTINCT_ADAPTERS)}
    requests = QUICK_REQUESTS if args.quick else REQUESTS
    spread8 = [f"ad{i % ADAPTERS}" for i in range(requests)]
    spread32 = [f"ad{i % THRASH_ADAPTERS}" for i in range(requests)]
    spread64 = [f"ad{i % DISTINCT_ADAPTERS}" for i in range(DISTINCT_ADAPTERS)]
    rows: list[dict[str, Any]] = []
    startups: dict[str, float] = {}

    @contextmanager
    def served(label: str, command_for_port: Callable[[int], list[str]],
               warm: int = ADAPTERS) -> Iterator[dict[str, Any]]:
        """A server on a free port (command_for_port(port)), ready, its startup recorded, warmed up
        (the base model and ad0..ad{warm-1})."""
        port = free_port()
        with serve(label, command_for_port(port), port, "/ready", LOGS / f"serving_compare_{label}.log",
                   env=SERVER_ENV, timeout=READY_TIMEOUT_S) as srv:
            startups[label] = srv["startup_s"]
            warm_start = time.perf_counter()
            warm_up(srv["url"], warm)
            print(f"  warmed up (base + {warm} adapters) in {time.perf_counter() - warm_start:.1f} s", flush=True)
            yield srv

    with tempfile.TemporaryDirectory(prefix="serving_compare_") as tmp:
        # (c) and (d): one loraswap server, 8 adapters registered.
        with served("loraswap_8", lambda port: loraswap_cmd(port, Path(tmp) / "data8", adapters)) as srv:
            rows.append(measure("loraswap", "loraswap_base", srv["url"], [BASE] * requests, tokens,
                                startup_s=srv["startup_s"], note="8 adapters registered, requests to the base model"))
            rows.append(measure("loraswap", "loraswap_8", srv["url"], spread8, tokens, startup_s=srv["startup_s"],
                                note="requests spread over 8 adapters on 8 slots"))

        # (e): 64 adapters on 64 slots, 64 requests with `requests` in flight (a second server start).
        flags64 = with_slots(LORASWAP_FLAGS, DISTINCT_ADAPTERS)
        with served("loraswap_64", lambda port: loraswap_cmd(port, Path(tmp) / "data64", distinct, flags64),
                    warm=DISTINCT_ADAPTERS) as srv:
            rows.append(measure("loraswap", "loraswap_64_distinct", srv["url"], spread64, tokens,
                                concurrency=requests, startup_s=srv["startup_s"], flags=" ".join(flags64),
                                note=f"{DISTINCT_ADAPTERS} adapters on {DISTINCT_ADAPTERS} slots, all warmed up; "
                                     f"{len(spread64)} requests (request i to ad{{i % {DISTINCT_ADAPTERS}}}), "
                                     f"{requests} in flight"))

        # (f): 32 adapters registered on 8 slots (only with --thrash: a third server start).
        if args.thrash:
            with served("loraswap_32", lambda port: loraswap_cmd(port, Path(tmp) / "data32", thrash)) as srv:
                rows.append(measure("loraswap", "loraswap_32_on_8", srv["url"], spread32, tokens,
                                    startup_s=srv["startup_s"],
                                    note="32 adapters on 8 slots, every request a different adapter (swaps, waits)"))

    # (a): the PEFT-switching server.
    peft_requests = QUICK_PEFT_REQUESTS if args.quick else FULL_PEFT_REQUESTS

    def peft_cmd(port: int) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "peft_server.py"), "--port", str(port), "--served-model-name", BASE,
                *modules(adapters)]

    if not args.only_loraswap:
        with served("peft_server", peft_cmd) as srv:
            note = ("one request at a time (set_adapter + generate), token-by-token streaming: TTFT includes the "
                    "wait behind the requests ahead")
            if peft_requests != requests:
                note += (f"; the first {peft_requests} of the {requests} requests (tok/s is per-request serial, "
                         "TTFT not comparable)")
            rows.append(measure("peft-server", "peft_switching", srv["url"], spread8[:peft_requests], tokens,
                                startup_s=srv["startup_s"], note=note))

        # (b): PEFT's mixed batch, in this process.
        rows.append(peft_mixed_batch(adapters, tokens, requests))

    tok_s = {r["point"]: r["tok_s"] for r in rows}
    base, peft = tok_s.get("loraswap_base"), tok_s.get("peft_switching")
    for r in rows:
        r["vs_loraswap_base"] = ratio(r["tok_s"], base)
        r["vs_peft_switching"] = ratio(r["tok_s"], peft)
    d_vs_c = ratio(tok_s["loraswap_8"], base)
    d_vs_a = ratio(tok_s["loraswap_8"], peft)
    e_vs_c = ratio(tok_s.get("loraswap_64_distinct"), base)
    targets = [
        target_row("mixed8_vs_base", d_vs_c, f"loraswap 8 mixed adapters tok/s / loraswap base-model tok/s, "
                                             f"{requests} concurrent"),
        target_row("distinct64_vs_base", e_vs_c,
                   f"loraswap {DISTINCT_ADAPTERS} distinct adapters over {requests} concurrent requests tok/s / "
                   "loraswap base-model tok/s"),
    ]
    if d_vs_a is not None:  # not keyed: an older target, not issue 17's
        targets.append({"metric": "loraswap 8 mixed adapters tok/s / PEFT-switching server tok/s", "value": d_vs_a,
                        "target": 10.0, "met": d_vs_a >= 10.0})
    summary = {
        "tok_s": tok_s,
        "ttft_p50_s": {r["point"]: r["ttft_p50_s"] for r in rows},
        "ttft_max_s": {r["point"]: r["ttft_max_s"] for r in rows},
        "wall_s": {r["point"]: r["wall_s"] for r in rows},
        "vs_loraswap_base": {r["point"]: r["vs_loraswap_base"] for r in rows},
        "vs_peft_switching": {r["point"]: r["vs_peft_switching"] for r in rows},
        "targets": targets,
        "startup_s": startups,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    write(args.out, "serving_compare", rows, summary, quick=args.quick, requests=requests, new_tokens=tokens,
          adapters=ADAPTERS, thrash_adapters=THRASH_ADAPTERS, distinct_adapters=DISTINCT_ADAPTERS, dtype="float32",
          loraswap_flags=" ".join(LORASWAP_FLAGS), loadavg_start=load_start, loadavg_end=os.getloadavg(),
          threads_flag=args.threads)
    print(json.dumps({k: summary[k] for k in ("tok_s", "vs_loraswap_base", "vs_peft_switching", "targets",
                                              "total_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
