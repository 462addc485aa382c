"""Ray Serve scale-out: adapter-affinity (multiplexed) routing as a ratio to Ray's round robin,
the same deployment in the same run.

`loraswap serve-ray`'s application on a local Ray instance of this machine: 2 engine replicas of
1 CPU each on the embedded SmolLM2-135M-Instruct (float32), 4 LoRA slots and 4 CPU-cached
adapters per replica, 16 rank-16 all-linear adapters in the shared store. A closed loop of
CLIENTS concurrent clients sends REQUESTS completions (MAX_TOKENS tokens each, EOS ignored) whose
adapters follow a Zipf popularity (s = ZIPF_S; the same seeded sequence for both points):

  multiplexed:  each request tagged with its adapter as Ray's multiplexed model id; Ray's
                default router prefers a replica that holds the adapter (what serve-ray does);
  round_robin:  no tag, Ray's RoundRobinRouter (ray.serve.experimental): replicas in turn.

Reported per point: generated tokens/s through the ingress, slot loads and disk loads (reads
into the CPU cache) summed over the replicas, the busiest replica's share of the requests
(affinity trades balance for fewer loads), mean and p95 request latency; and the ratios.
The points alternate (multiplexed, round robin, round robin, multiplexed in full mode) and each
is a fresh deployment, so both start cold.

    .venv/bin/python bench/ray_multiplex.py --quick   # 1 run of each, 96 requests; ~3 min
    .venv/bin/python bench/ray_multiplex.py           # 2 runs of each, 192 requests; ~8 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from common import make_adapters, model_dir, write  # noqa: E402

REPLICAS, SLOTS, CPU_CACHE, ADAPTERS = 2, 4, 4, 16
REQUESTS, QUICK_REQUESTS = 192, 96
CLIENTS = 8
MAX_TOKENS = 24
ZIPF_S = 1.1
ROUND_ROBIN = "ray.serve.experimental.round_robin_router:RoundRobinRouter"
PROMPT = "Write one sentence about the sea."


def adapter_sequence(count: int, seed: int = 0) -> list[str]:
    """`count` adapter names drawn with Zipf popularity over ADAPTERS (rank 1 most popular)."""
    weights = 1.0 / np.arange(1, ADAPTERS + 1) ** ZIPF_S
    rng = np.random.default_rng(seed)
    picks = rng.choice(ADAPTERS, size=count, p=weights / weights.sum())
    return [f"ad{i}" for i in picks]


async def drive(base_url: str, names: list[str]) -> tuple[float, list[float], int]:
    """CLIENTS concurrent clients through `names` in order: (wall seconds, latencies, tokens)."""
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in names:
        queue.put_nowait(name)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            name = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(f"{base_url}/v1/completions", json={
                "model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(trust_env=False, timeout=600.0) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return time.perf_counter() - start, latencies, tokens


def replica_counters(base_url: str) -> dict[str, dict[str, float]]:
    """replica id -> its slot loads, disk loads (CPU-cache misses) and finished requests."""
    import httpx

    states = httpx.get(f"{base_url}/ready", timeout=60.0, trust_env=False).json()["replica_status"]
    return {rid: {"slot_loads": s["slots"]["loads"], "disk_loads": s["adapter_cpu_cache"]["misses"],
                  "requests": sum(s["finished"].values())} for rid, s in states.items()}


def counter_deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], requests: int) -> dict[str, Any]:
    deltas = {rid: {k: v - before.get(rid, {}).get(k, 0) for k, v in counts.items()} for rid, counts in after.items()}
    return {
        "slot_loads": sum(d["slot_loads"] for d in deltas.values()),
        "disk_loads": sum(d["disk_loads"] for d in deltas.values()),
        "busiest_replica_share": round(max(d["requests"] for d in deltas.values()) / requests, 2),
    }


def run_point(point: str, settings: Any, ray_settings: Any, base_url: str, names: list[str]) -> dict[str, Any]:
    from ray import serve

    from server.api.ray_serve import APP_NAME, build_app

    multiplexed = point == "multiplexed"
    app = build_app(settings, ray_settings, affinity=multiplexed, request_router=None if multiplexed else ROUND_ROBIN)
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        before = replica_counters(base_url)  # after start-up (its adapters are validated then)
        wall, latencies, tokens = asyncio.run(drive(base_url, names))
        counters = counter_deltas(before, replica_counters(base_url), len(names))
    finally:
        serve.delete(APP_NAME)
    row = {"point": point, "requests": len(names), "tokens": tokens, "wall_s": round(wall, 2),
           "tok_s": round(tokens / wall, 1), "latency_mean_s": round(statistics.mean(latencies), 3),
           "latency_p95_s": round(float(np.percentile(latencies, 95)), 3), **counters}
    print(row, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ray_multiplex.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from config.ray_settings import RaySettings
    from config.settings import Settings
    from tests.e2e.server_process import free_port

    base = model_dir()
    scratch = Path(tempfile.mkdtemp(prefix="loraswap-ray-bench-"))
    adapters = make_adapters(ROOT / ".bench-cache" / "adapters", ADAPTERS, base=base)
    settings = Settings(model=str(base), max_loras=SLOTS, max_cpu_loras=CPU_CACHE, max_num_seqs=CLIENTS,
                        max_model_len=512, data_dir=scratch / "store",
                        lora_modules={name: str(path) for name, path in adapters.items()})
    ray_settings = RaySettings(replicas=REPLICAS, replica_cpus=1.0)
    requests = QUICK_REQUESTS if args.quick else REQUESTS
    names = adapter_sequence(requests)
    order = ["multiplexed", "round_robin"] if args.quick else ["multiplexed", "round_robin", "round_robin", "multiplexed"]

    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows = [run_point(point, settings, ray_settings, f"http://127.0.0.1:{port}", names) for point in order]
    finally:
        serve.shutdown()
        ray.shutdown()

    def mean(point: str, key: str) -> float:
        return statistics.mean(r[key] for r in rows if r["point"] == point)

    summary = {
        "tok_s_vs_round_robin": round(mean("multiplexed", "tok_s") / mean("round_robin", "tok_s"), 2),
        "slot_loads_multiplexed": mean("multiplexed", "slot_loads"),
        "slot_loads_round_robin": mean("round_robin", "slot_loads"),
        "disk_loads_multiplexed": mean("multiplexed", "disk_loads"),
        "disk_loads_round_robin": mean("round_robin", "disk_loads"),
        "busiest_share_multiplexed": round(mean("multiplexed", "busiest_replica_share"), 2),
        "busiest_share_round_robin": round(mean("round_robin", "busiest_replica_share"), 2),
        "latency_mean_vs_round_robin": round(mean("multiplexed", "latency_mean_s") / mean("round_robin", "latency_mean_s"), 2),
    }
    print(summary, flush=True)
    write(args.out, "ray_multiplex", rows, summary, quick=args.quick, replicas=REPLICAS, slots=SLOTS,
          cpu_cache=CPU_CACHE, adapters=ADAPTERS, clients=CLIENTS, max_tokens=MAX_TOKENS, zipf_s=ZIPF_S,
          requests=requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
