"""Throughput and time to first token of the engine against concurrency and the number of adapters.

The embedded SmolLM2-135M in float32, driven in process through the same Engine the server runs
(scheduler, slot table, sampling; token ids out: no detokenization, no HTTP, so the client does not compete with the
engine for the two cores). Closed loop: `c` clients each send `ROUNDS` requests back to back
(a ~35-token chat prompt, `NEW_TOKENS` greedy tokens, EOS ignored).

- concurrency sweep: c = 1..64 on the base model, and with the requests spread over 8 adapters;
- adapter sweep: c = 32 over n = 1..32 distinct adapters on 8 slots (n > 8 forces swaps);
  n = 0 (base model) is the baseline of the ratios;

each for eager decode and `--compile` (decode over all max_num_seqs rows through inductor).
Adapters are random rank-16 on all linear layers. Writes bench/results/serving_sweep.json.

    .venv/bin/python bench/serving_sweep.py            # full: about 15 minutes on 2 cores
    .venv/bin/python bench/serving_sweep.py --quick    # fewer points, eager only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]

import torch
from common import QUESTIONS as COMMON_QUESTIONS
from harness import write_results

from adapters.peft_format import LoraConfig
from adapters.slot_bank import SlotBank
from adapters.slot_table import SlotTable
from adapters.validation import AdapterWeights, ModuleLora
from server.engine import Engine
from server.model_source import resolve_model
from server.runner import ModelRunner
from server.sampling import SamplingParams
from server.sequence import GenerationRequest, TokenOutput
from server.weights import build_model

MAX_ROWS = 64
MAX_LEN = 256
SLOTS = 8
RANK = 16
NEW_TOKENS = 32
ROUNDS = 2
QUESTIONS = COMMON_QUESTIONS[:8]  # the shared workload's first eight chat questions


def random_adapters(bank: SlotBank, count: int) -> dict[str, AdapterWeights]:
    adapters = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        modules = {
            name: ModuleLora(a=torch.randn(RANK, d_in, generator=g) / d_in**0.5,
                             b=torch.randn(d_out, RANK, generator=g) * 0.01, scaling=1.0)
            for name, (d_in, d_out) in bank.spec().targets.items()
        }
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")
        adapters[f"ad{i}"] = AdapterWeights(f"ad{i}", config, modules)
    return adapters


@dataclass
class Timing:
    submitted: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0


@dataclass
class ClosedLoop:
    """c clients, each submitting its next request when the previous one finishes."""

    engine: Engine
    prompts: list[list[int]]
    adapters: list[str | None]
    rounds: int
    timings: list[Timing] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)
    _left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, clients: int) -> None:
        self._left = clients * self.rounds
        for client in range(clients):
            self._send(client, 0)
        if not self.finished.wait(timeout=1800):
            raise TimeoutError("benchmark point did not finish")

    def _send(self, client: int, round_: int) -> None:
        index = len(self.timings)
        timing = Timing(time.perf_counter())
        self.timings.append(timing)
        request = GenerationRequest(
            f"c{client}r{round_}", self.prompts[index % len(self.prompts)], max_tokens=NEW_TOKENS,
            sampling=SamplingParams(temperature=0), ignore_eos=True, adapter=self.adapters[client],
        )

        def sink(event: TokenOutput) -> None:  # runs on the engine thread
            now = time.perf_counter()
            if event.token_ids and timing.first is None:
                timing.first = now
            timing.tokens += len(event.token_ids)
            if event.error is not None:
                print(f"request failed: {event.error}", flush=True)
            if event.finished:
                timing.done = now
                with self._lock:
                    self._left -= 1
                    left = self._left
                if round_ + 1 < self.rounds:
                    self._send(client, round_ + 1)
                elif left == 0:
                    self.finished.set()

        self.engine.submit(request, sink)


def measure(engine: Engine, prompts: list[list[int]], clients: int, adapters: int) -> dict[str, Any]:
    names: list[str | None] = [f"ad{c % adapters}" if adapters else None for c in range(clients)]
    stats_before = engine.stats()
    loop = ClosedLoop(engine, prompts, names, ROUNDS)
    start = time.perf_counter()
    loop.run(clients)
    end = max(t.done for t in loop.timings if t.done is not None)
    ttft = [t.first - t.submitted for t in loop.timings if t.first is not None]
    slots_after, slots_before = engine.stats().get("slots", {}), stats_before.get("slots", {})
    return {
        "clients": clients, "adapters": adapters, "requests": len(loop.timings),
        "tokens_per_s": sum(t.tokens for t in loop.timings) / (end - start),
        "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft),
        "slot_loads": slots_after.get("loads", 0) - slots_before.get("loads", 0),  # type: ignore[operator]
    }


def build_engine(compile: bool) -> tuple[Engine, list[list[int]], float]:
    from transformers import AutoTokenizer

    folder = resolve_model(None)
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=MAX_ROWS, max_len=MAX_LEN, pack=not compile)
    bank = SlotBank(model, num_slots=SLOTS, max_rank=RANK, fixed_window=compile)
    store = random_adapters(bank, 32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = Engine(ModelRunner(model, bank, compile=compile), eos_ids=frozenset(),
                    slot_table=SlotTable(SLOTS), adapter_weights=store.__getitem__, max_waiting=4096)
    start = time.perf_counter()
    engine.runner.warm_up()
    warm_s = time.perf_counter() - start
    engine.start()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True)["input_ids"]
        for q in QUESTIONS
    ]
    return engine, prompts, warm_s


def sweep(mode: str, concurrency: list[int], adapter_counts: list[int], mixed: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    engine, prompts, warm_s = build_engine(compile=mode == "compile")
    measure(engine, prompts, 2, 1)  # allocator warm-up, untimed
    rows = []
    series = [("concurrency", c, 0) for c in concurrency]
    if mixed:
        series += [("concurrency-8-adapters", c, 8) for c in concurrency]
    series += [("adapters", 32, n) for n in adapter_counts]
    for name, clients, adapters in series:
        row = {"mode": mode, "series": name, **measure(engine, prompts, clients, adapters)}
        rows.append(row)
        print(f"{mode:8} {name:24} c={clients:3} adapters={adapters:3} {row['tokens_per_s']:7.1f} tok/s "
              f"ttft p50 {row['ttft_p50_s']:.2f} s max {row['ttft_max_s']:.2f} s loads {row['slot_loads']}", flush=True)
    compile_info = engine.stats()["compile"]
    engine.stop()
    return rows, {"warm_up_s": warm_s, **compile_info}  # type: ignore[dict-item]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Adapter sweep: throughput / base at c=32 (same mode). Compile rows: / eager, same point."""
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["series"] == "adapters" and r["adapters"] == 0}
    eager = {(r["series"], r["clients"], r["adapters"]): r["tokens_per_s"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        if r["series"] == "adapters" and r["mode"] in base:
            r["vs_base"] = round(r["tokens_per_s"] / base[r["mode"]], 3)
        key = (r["series"], r["clients"], r["adapters"])
        if r["mode"] == "compile" and key in eager:
            r["vs_eager"] = round(r["tokens_per_s"] / eager[key], 3)


def markdown(path: Path) -> str:
    """The README tables from a results file."""
    rows = json.loads(path.read_text())["rows"]
    point = {(r["mode"], r["series"], r["clients"], r["adapters"]): r for r in rows}
    lines = ["| concurrent requests | base tok/s | TTFT p50 / max (s) | 8 adapters tok/s (vs base) | --compile tok/s (vs eager) |",
             "|---:|---:|---:|---:|---:|"]
    for c in sorted({r["clients"] for r in rows if r["series"] == "concurrency"}):
        base = point[("eager", "concurrency", c, 0)]
        mixed = point.get(("eager", "concurrency-8-adapters", c, 8))
        comp = point.get(("compile", "concurrency", c, 0))
        lines.append(
            f"| {c} | {base['tokens_per_s']:.1f} | {base['ttft_p50_s']:.2f} / {base['ttft_max_s']:.2f} | "
            + (f"{mixed['tokens_per_s']:.1f} ({mixed['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if mixed else "-")
            + " | " + (f"{comp['tokens_per_s']:.1f} ({comp['vs_eager']:.2f}x)" if comp else "-") + " |"
        )
    lines += ["", "| distinct adapters (32 requests, 8 slots) | tok/s | vs base | TTFT p50 / max (s) | slot loads |",
              "|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["series"] == "adapters" and r["mode"] == "eager"), key=lambda r: r["adapters"]):
        label = "0 (base model)" if r["adapters"] == 0 else str(r["adapters"])
        lines.append(f"| {label} | {r['tokens_per_s']:.1f} | {r.get('vs_base', 1.0):.2f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_max_s']:.2f} | {r['slot_loads']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few points, eager only (about 3 minutes)")
    parser.add_argument("--table", type=Path, help="print the README tables of a results file and exit")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(args.table))
        return
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"max_num_seqs": MAX_ROWS, "max_model_len": MAX_LEN, "slots": SLOTS, "rank": RANK,
                             "new_tokens": NEW_TOKENS, "rounds": ROUNDS}
    if args.quick:
        rows += sweep("eager", [1, 8, 32], [0, 8, 32], mixed=False)[0]
    else:
        eager_rows, _ = sweep("eager", [1, 2, 4, 8, 16, 32, 64], [0, 1, 2, 4, 8, 16, 32], mixed=True)
        compile_rows, extra["compile"] = sweep("compile", [1, 8, 64], [0, 8], mixed=False)
        rows += eager_rows + compile_rows
    add_ratios(rows)
    write_results("serving_sweep_quick" if args.quick else "serving_sweep", rows, **extra)


if __name__ == "__main__":
    main()
