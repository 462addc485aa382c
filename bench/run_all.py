"""`make bench` / `make bench-quick`: every side-by-side benchmark in one run, one results file.

Runs the parts one after another (each in its own process, so one's memory and threads never
disturb the next), then merges their JSON into bench/results/<date>-<host>.json and writes the
Markdown tables and the PNG plot next to it (bench/report.py). With --readme, the README's
benchmark block is replaced by the new tables.

    .venv/bin/python bench/run_all.py            # full: ~21 minutes on 2 cores, builds the vLLM env
    .venv/bin/python bench/run_all.py --quick    # ~5 minutes: fewer tokens, no vLLM, no compile, one ITL row

(Estimates: the last full run took 17 minutes and the last quick one 2.3, before the 64-adapter
point of serving_compare and bench/long_prompt_itl.py were added.)

Every target of bench/targets.py appears in the report's Targets table, measured or marked "not
measured in this run" (in --quick: the vLLM ones and compiled vs eager).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import header  # noqa: E402
from bench.report import targets, update_readme, write_report  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def parts(quick: bool, scratch: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments after the script) in run order; engine_compare reads the limits."""
    q = ["--quick"] if quick else []
    out = [
        ("machine_limits", [*q]),
        ("engine_compare", [*q, "--limits", str(scratch / "machine_limits.json"), "--hf-compile-limit", "120"]),
        ("hotswap_compare", [*q]),
        ("serving_compare", [*q]),
        ("long_prompt_itl", [*q]),
        ("adapter_features", [*q]),
        ("structured_outputs", [*q]),
        ("ray_multiplex", [*q]),
    ]
    if not quick:  # vLLM's environment (~3.5 GB) is built by the full benchmark only
        out.append(("vllm_baseline", ["--build-env"]))
    return out


def run_part(name: str, args: list[str], scratch: Path, timeout: float) -> dict[str, Any]:
    out = scratch / f"{name}.json"
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args, "--out", str(out)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=BENCH.parent)
    try:
        code = proc.wait(timeout=timeout)
        failed = None if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM first: the parts stop the servers they started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        failed = f"timed out after {timeout:.0f} s"
    elapsed = round(time.perf_counter() - start, 1)
    if failed is None and out.is_file():
        result: dict[str, Any] = json.loads(out.read_text())
        result["wall_s"] = elapsed
        return result
    print(f"!! {name} failed: {failed or 'no results file'}", flush=True)
    return {"name": name, "error": failed or "no results file", "wall_s": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these parts")
    parser.add_argument("--readme", action="store_true", help="put the new tables and plot into README.md")
    parser.add_argument("--part-timeout", type=float, default=900, help="seconds one part may take")
    args = parser.parse_args()
    started = time.perf_counter()
    meta = header()
    # The load average says whether anything else competed for the cores during the run.
    merged: dict[str, Any] = {**meta, "quick": args.quick, "loadavg_start": os.getloadavg(), "parts": {}}
    with tempfile.TemporaryDirectory(prefix="loraswap-bench-") as tmp:
        scratch = Path(tmp)
        for name, extra in parts(args.quick, scratch):
            if args.only and name not in args.only:
                continue
            merged["parts"][name] = run_part(name, extra, scratch, args.part_timeout)
    merged["wall_s"] = round(time.perf_counter() - started, 1)
    merged["loadavg_end"] = os.getloadavg()
    merged["targets"] = targets(merged["parts"])  # with how far each missed one is from its target
    stem = f"{meta['date']}-{meta['host']}" + ("-quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    results = RESULTS / f"{stem}.json"
    results.write_text(json.dumps(merged, indent=2) + "\n")
    markdown = write_report(results)
    print(markdown)
    print(f"wrote {results} and its .md and .png ({merged['wall_s']:.0f} s)")
    if args.readme:
        update_readme(BENCH.parent / "README.md", results)
    return 1 if any("error" in p for p in merged["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
