"""Swapping a LoRA adapter: loraswap's slot write against PEFT's hotswap and load_adapter; no
recompilation under --compile; resident memory over load/unload churn.

The same adapter files for everyone: random rank-16 adapters on all linear layers of the embedded
SmolLM2-135M (float32, CPU), as PEFT saves them (bench.common.make_adapters). Median over 20
swaps each (5 with --quick), cycling through different adapters so every swap changes weights:

- loraswap `SlotBank.load(slot, weights)`: weights already read and validated in memory (what the
  engine does when a request's adapter is not resident); and end to end: read the files,
  validate, load;
- PEFT `hotswap_adapter_from_state_dict` (state dict already in memory, the counterpart of the
  first) and `peft.utils.hotswap.hotswap_adapter` (from the files, the counterpart of the second)
  on a PeftModel holding adapter "default";
- PEFT `load_adapter(folder, new name)` + `set_adapter(new name)` (then set back and deleted, untimed);
- recompilations: ModelRunner(compile=True) over a SlotBank(fixed_window=True) with one slot,
  `warm_up()`, then `SWAPS` requests through an Engine, each on a different adapter than the one
  before (so each is written into slot 0 on admission): a short prompt, one compiled decode step;
  `runner.recompilations` must stay 0;
- memory: bench/adapter_churn.py's `churn` (upload, load into a slot, unload, delete through the
  admin API, in process) in a fresh child process; resident memory after all cycles vs after 10.

    .venv/bin/python bench/hotswap_compare.py [--quick] [--out FILE]
    (full: about 2-3 minutes on 2 cores; --quick: 5 swaps under compile, 50 churn cycles,
    under a minute)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]  # adapter_churn imports `harness`

from bench.common import make_adapters, messages, model_dir, write
from bench.servers import die_with_parent, stop_group

NAME = "hotswap_compare"
ADAPTERS = 8
REPS, QUICK_REPS = 20, 5
SWAPS, QUICK_SWAPS = 100, 5
CYCLES, QUICK_CYCLES = 1000, 50
CHURN_LIMIT_S = 600
COMPILE_ROWS, COMPILE_LEN = 4, 64  # one attention window: warm-up compiles 2 graphs
DECODE_TOKENS = 2  # per request in the compile check: 1 from prefill, 1 compiled decode step
TARGET_MS = 5.0
TARGET_GROWTH = 0.02


def times_ms(fn: Callable[[int], object], reps: int, warm: int = 2, after: Callable[[int], object] | None = None) -> list[float]:
    """fn(i) for i in range(warm + reps); wall ms of the last reps. after(i), if given, runs untimed."""
    out = []
    for i in range(warm + reps):
        gc.collect()
        start = time.perf_counter()
        fn(i)
        elapsed = (time.perf_counter() - start) * 1000
        if after is not None:
            after(i)
        if i >= warm:
            out.append(elapsed)
    return out


def row(system: str, operation: str, ms: list[float]) -> dict[str, Any]:
    r = {"system": system, "operation": operation, "reps": len(ms), "median_ms": round(statistics.median(ms), 3),
         "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}
    print(f"{system:9s} {operation:48s} median {r['median_ms']:9.3f} ms  (min {r['min_ms']:.3f}, max {r['max_ms']:.3f})",
          flush=True)
    return r


# ---- swap times -----------------------------------------------------------------------------
def loraswap_rows(folders: list[Path], reps: int) -> list[dict[str, Any]]:
    from adapters.peft_format import read_adapter_dir
    from adapters.slot_bank import SlotBank
    from adapters.validation import validate
    from server.weights import build_model

    model = build_model(model_dir(), dtype=torch.float32, device="cpu", max_rows=8, max_len=256)
    bank = SlotBank(model, num_slots=8, max_rank=16)
    weights = [validate(read_adapter_dir(f, f.name), bank.spec(), f.name) for f in folders]
    n = len(folders)

    def end_to_end(i: int) -> None:
        folder = folders[i % n]
        bank.load(0, validate(read_adapter_dir(folder, folder.name), bank.spec(), folder.name))

    rows = [row("loraswap", "SlotBank.load (validated weights in memory)", times_ms(lambda i: bank.load(0, weights[i % n]), reps)),
            row("loraswap", "read + validate + SlotBank.load", times_ms(end_to_end, reps))]
    return rows


def peft_rows(folders: list[Path], reps: int) -> list[dict[str, Any]]:
    from peft import LoraConfig, PeftModel
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import (
        _insert_adapter_name_into_state_dict,
        load_peft_weights,
    )
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="default").eval()
    others = folders[1:]
    n = len(others)
    # In memory, as hotswap_adapter prepares them after reading the files.
    states = [_insert_adapter_name_into_state_dict(load_peft_weights(str(f), device="cpu"), adapter_name="default",
                                                   parameter_prefix="lora_") for f in others]
    configs = [LoraConfig.from_pretrained(str(f)) for f in others]
    rows = []
    with torch.inference_mode():
        rows.append(row("peft", "hotswap_adapter_from_state_dict (in memory)", times_ms(
            lambda i: hotswap_adapter_from_state_dict(model, states[i % n], "default", configs[i % n]), reps)))
        rows.append(row("peft", "hotswap_adapter (from the files)", times_ms(
            lambda i: hotswap_adapter(model, str(others[i % n]), adapter_name="default", torch_device="cpu"), reps)))

        def load(i: int) -> None:
            model.load_adapter(str(others[i % n]), adapter_name=f"new{i}")
            model.set_adapter(f"new{i}")

        def drop(i: int) -> None:
            model.set_adapter("default")
            model.delete_adapter(f"new{i}")

        rows.append(row("peft", "load_adapter + set_adapter (new name)", times_ms(load, reps, after=drop)))
    return rows


# ---- recompilations -----------------------------------------------------------------------------
def recompile_check(folders: list[Path], swaps: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from adapters.peft_format import read_adapter_dir
    from adapters.slot_bank import SlotBank
    from adapters.slot_table import SlotTable
    from adapters.validation import validate
    from server.engine import Engine
    from server.runner import ModelRunner
    from server.sampling import SamplingParams
    from server.sequence import GenerationRequest
    from server.weights import build_model

    model = build_model(model_dir(), dtype=torch.float32, device="cpu", max_rows=COMPILE_ROWS, max_len=COMPILE_LEN,
                        pack=False)
    bank = SlotBank(model, num_slots=1, max_rank=16, fixed_window=True)
    weights = {f.name: validate(read_adapter_dir(f, f.name), bank.spec(), f.name) for f in folders}
    names = list(weights)
    tok = AutoTokenizer.from_pretrained(model_dir())
    runner = ModelRunner(model, bank, compile=True)
    engine = Engine(runner, eos_ids=frozenset(), slot_table=SlotTable(1), adapter_weights=weights.__getitem__)
    start = time.perf_counter()
    runner.warm_up()
    warm_s = time.perf_counter() - start
    warm_graphs = runner.compile_counter.graphs
    print(f"compile warm-up: {warm_graphs} graphs in {warm_s:.1f} s", flush=True)
    # A short prompt (the question alone): prefill is eager and not what this checks; it only has to
    # be cheap so that 100 swaps stay quick.
    prompt = list(tok.encode(messages(0)[0]["content"], add_special_tokens=False))
    failures: list[str] = []
    generated = [0]

    def sink(event: Any) -> None:
        generated[0] += len(event.token_ids)
        if event.error is not None:
            failures.append(event.error)

    start = time.perf_counter()
    for k in range(swaps):
        request = GenerationRequest(f"swap{k}", prompt, max_tokens=DECODE_TOKENS, sampling=SamplingParams(temperature=0),
                                    ignore_eos=True, adapter=names[k % len(names)])
        engine.submit(request, sink)
        engine.run_until_idle()
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    if failures or generated[0] != swaps * DECODE_TOKENS:
        raise RuntimeError(f"compile check: {generated[0]} tokens for {swaps} requests; {failures[:1]}")
    result = {
        "swaps": swaps, "slot_loads": stats["slots"]["loads"],  # type: ignore[index]
        "warm_up_s": round(warm_s, 1), "warm_graphs": warm_graphs, "recompilations": runner.recompilations,
        "ms_per_swap_and_request": round(elapsed / swaps * 1000, 1), "prompt_tokens": len(prompt),
        "decode_tokens_per_request": DECODE_TOKENS,
        "max_num_seqs": COMPILE_ROWS, "max_model_len": COMPILE_LEN,
    }
    print(f"{swaps} swaps under compile: {result['slot_loads']} slot loads, {result['recompilations']} recompilations "
          f"({result['ms_per_swap_and_request']} ms per swap + request)", flush=True)
    return result


# ---- memory churn -------------------------------------------------------------------------------
def churn_child(cycles: int) -> None:
    """adapter_churn.churn (`cycles` cycles) in this (fresh) process; prints RESULT json."""
    from adapter_churn import churn

    marks, elapsed = churn(cycles)
    print("RESULT " + json.dumps({"marks": marks, "seconds": elapsed}), flush=True)


def memory_churn(cycles: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--churn-child", str(cycles)]
    # Its own session, and it dies with this process.
    proc = subprocess.Popen(die_with_parent(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=CHURN_LIMIT_S)
    finally:  # also on a timeout, errors and SIGTERM
        stop_group(proc, grace=5.0)
    result = next((line[7:] for line in stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"churn child failed (exit {proc.returncode}): {stderr[-2000:]}")
    data = json.loads(result)
    marks = {int(k): v for k, v in data["marks"].items()}
    growth = marks[cycles] / marks[10] - 1
    out = {"cycles": cycles, "rss_mb": {str(c): round(m, 1) for c, m in sorted(marks.items())},
           "rss_ratio_last_vs_10": round(marks[cycles] / marks[10], 4), "memory_growth_pct": round(growth * 100, 2),
           "ms_per_cycle": round(data["seconds"] / cycles * 1000, 1)}
    print(f"churn: rss {marks[10]:.1f} MB after 10 cycles, {marks[cycles]:.1f} MB after {cycles}: "
          f"{out['memory_growth_pct']:+.2f}% ({out['ms_per_cycle']} ms/cycle)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} repetitions, {QUICK_SWAPS} swaps under compile, {QUICK_CYCLES} churn cycles")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/hotswap_compare[_quick].json)")
    parser.add_argument("--churn-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.churn_child:
        churn_child(args.churn_child)
        return
    # A SIGTERM (from run_all, make or a person) unwinds normally, so the churn child is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or ROOT / "bench" / "results" / f"{NAME}{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    folders = list(make_adapters(ROOT / ".bench-cache" / "adapters", ADAPTERS).values())
    swaps = QUICK_SWAPS if args.quick else SWAPS
    cycles = QUICK_CYCLES if args.quick else CYCLES
    reps = QUICK_REPS if args.quick else REPS
    rows = loraswap_rows(folders, reps) + peft_rows(folders, reps)
    gc.collect()
    compiled = recompile_check(folders, swaps)
    churn = memory_churn(cycles)

    ms = {r["operation"]: r["median_ms"] for r in rows}
    ours = ms["SlotBank.load (validated weights in memory)"]
    ours_e2e = ms["read + validate + SlotBank.load"]
    peft_mem = ms["hotswap_adapter_from_state_dict (in memory)"]
    peft_hot = ms["hotswap_adapter (from the files)"]
    peft_load = ms["load_adapter + set_adapter (new name)"]
    growth = churn["memory_growth_pct"] / 100
    summary = {
        "adapter": "rank 16, all linear layers (7 projections x 30 layers), float32",
        "reps": reps,
        "hotswap_ms_median": ours,
        "hotswap_end_to_end_ms_median": ours_e2e,
        "peft_hotswap_from_state_dict_ms_median": peft_mem,
        "peft_hotswap_ms_median": peft_hot,
        "peft_load_adapter_ms_median": peft_load,
        "ratios": {  # > 1: loraswap is faster
            "peft_hotswap_from_state_dict_vs_hotswap": round(peft_mem / ours, 1),
            "peft_hotswap_vs_hotswap_end_to_end": round(peft_hot / ours_e2e, 2),
            "peft_load_adapter_vs_hotswap_end_to_end": round(peft_load / ours_e2e, 2),
            "peft_hotswap_vs_hotswap": round(peft_hot / ours, 1),
            "peft_load_adapter_vs_hotswap": round(peft_load / ours, 1),
        },
        "recompilations": compiled["recompilations"],
        "compile_check": compiled,
        "memory_growth_pct": churn["memory_growth_pct"],
        "churn": churn,
        "targets": [
            {"metric": "hotswap ms (SlotBank.load, median)", "value": ours, "target": f"<= {TARGET_MS}",
             "met": ours <= TARGET_MS},
            {"metric": f"recompilations over {swaps} swaps under --compile", "value": compiled["recompilations"],
             "target": "== 0", "met": compiled["recompilations"] == 0 and compiled["slot_loads"] >= swaps},
            {"metric": f"resident memory growth, {cycles} vs 10 load/unload cycles (%)", "value": churn["memory_growth_pct"],
             "target": f"< {TARGET_GROWTH * 100:g}", "met": growth < TARGET_GROWTH},
        ],
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    for t in summary["targets"]:
        print(f"target {t['metric']}: {t['value']} ({t['target']}): {'met' if t['met'] else 'NOT met'}", flush=True)
    write(out, NAME, rows, summary, quick=args.quick)


if __name__ == "__main__":
    main()
