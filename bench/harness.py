"""What every micro-benchmark in bench/ shares: a timing loop and the results file format.

Run the scripts as `python bench/<name>.py`; this folder is then on sys.path.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def seconds_per_call(fn: Callable[[], object], min_time: float = 0.3) -> float:
    """Mean wall time of fn() over at least min_time seconds, after three warm-up calls."""
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def write_results(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    """bench/results/<name>.json with the date, host, torch version and thread count."""
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    header = {
        "date": date.today().isoformat(), "host": platform.node(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps({**header, **extra, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return out
