"""Resident memory under adapter churn: upload, load into a slot, unload and delete small adapters
1,000 times through the admin API (in process, the embedded SmolLM2-135M), and compare resident
memory after the first 10 cycles with after all of them. Growth should stay within a few percent.
Writes bench/results/adapter_churn.json.

    .venv/bin/python bench/adapter_churn.py [--cycles 1000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]

from fastapi.testclient import TestClient
from harness import write_results

from bench.common import model_dir
from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.adapters.helpers import write_random_adapter

RANK = 4
TARGETS = ["q_proj", "v_proj"]
FORMS = 8  # distinct adapters, reused: each upload is still a full cycle


def adapter_files(seed: int) -> dict[str, tuple[str, bytes]]:
    """A small random rank-4 adapter on q_proj and v_proj of every layer of the embedded model, as the
    two files of a multipart form."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_adapter(Path(tmp), model_dir(), rank=RANK, targets=TARGETS, seed=seed, scale=0.01)
        return {name: (name, (folder / name).read_bytes())
                for name in ("adapter_config.json", "adapter_model.safetensors")}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def churn(cycles: int, on_mark: Callable[[int, float], object] | None = None) -> tuple[dict[int, float], float]:
    """`cycles` times: upload (PUT), load into a slot, unload and delete an adapter through the admin
    API of an in-process server. Returns ({cycle: resident MB} at cycles 10, 100, every 250th and the
    last; seconds for all cycles). on_mark(cycle, MB), if given, is called at each mark."""
    forms = [adapter_files(seed) for seed in range(FORMS)]
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(max_num_seqs=4, max_model_len=256, max_loras=4, max_lora_rank=8, data_dir=Path(data))
        app = create_app(lambda metrics: build_service(settings, metrics))
        with TestClient(app, client=("127.0.0.1", 40000)) as client:
            while client.get("/ready").status_code != 200:
                time.sleep(0.2)
            marks: dict[int, float] = {}
            start = time.perf_counter()
            for cycle in range(1, cycles + 1):
                name = f"churn{cycle % 16}"
                for method, path, kwargs in (
                    ("PUT", f"/admin/adapters/{name}", {"files": forms[cycle % len(forms)]}),
                    ("POST", f"/admin/adapters/{name}/load", {}),
                    ("POST", f"/admin/adapters/{name}/unload", {}),
                    ("DELETE", f"/admin/adapters/{name}", {}),
                ):
                    response = client.request(method, path, **kwargs)
                    if response.status_code != 200:
                        raise RuntimeError(f"cycle {cycle}: {method} {path}: {response.text}")
                if cycle in (10, 100, cycles) or cycle % 250 == 0:
                    gc.collect()
                    marks[cycle] = rss_mb()
                    if on_mark is not None:
                        on_mark(cycle, marks[cycle])
            elapsed = time.perf_counter() - start
    return marks, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    args = parser.parse_args()
    marks, elapsed = churn(args.cycles, lambda cycle, mb: print(f"cycle {cycle:5d}: rss {mb:.1f} MB", flush=True))
    growth = marks[args.cycles] / marks[10] - 1
    print(f"growth from cycle 10 to {args.cycles}: {growth * 100:+.2f}% ({elapsed / args.cycles * 1000:.1f} ms/cycle)")
    rows = [{"cycle": c, "rss_mb": round(m, 1)} for c, m in sorted(marks.items())]
    write_results("adapter_churn", rows, cycles=args.cycles, growth_vs_cycle_10=round(growth, 4),
                  ms_per_cycle=round(elapsed / args.cycles * 1000, 1), target_growth="< 0.02")


if __name__ == "__main__":
    main()
