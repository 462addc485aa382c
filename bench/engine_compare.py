"""loraswap's engine against transformers' `generate`: generated tokens per second at batch 1, 8 and 32.

Same work on both sides: the embedded SmolLM2-135M in float32 (base model, no adapter), the
workload's chat prompts (bench.common.messages(i) for i < batch, rendered by the chat template and
encoded as the server does), `NEW_TOKENS` greedy tokens per request with EOS ignored, all `batch`
requests submitted at once.

- loraswap: the Engine the server runs (scheduler, prefill chunks, sampling; it returns token
  ids, detokenization is the service's), in process without HTTP, stepped on this thread until idle; eager = oneDNN-packed weights and
  `max_num_seqs` 32; `--compile` = ModelRunner(compile=True), packed weights too (reached through an opaque op), and
  max_num_seqs = batch (compiled decode always runs over all rows), `runner.warm_up()` first
  (its time is reported, not counted);
- transformers: `model.generate` on left-padded prompts with an explicit attention mask, pad =
  <|im_end|> (which is also EOS, hence min_new_tokens = max_new_tokens), greedy; compiled =
  `cache_implementation="static"` with a CompileConfig (mode "default", allowed on CPU): the
  first call compiles and is reported, the second is timed. It runs in a child process with a
  time limit; a timeout or an error is reported instead of the number.

Throughput = generated tokens / wall time of the whole batch, prefill included, for both (the
ratio target, at the largest batch and in the same mode on both sides: eager / eager, and compiled
/ compiled where both ran; each side's best mode is reported as `ratio_best_vs_best_batch32`). Also reported: the prefill phase and the decode rate after it (loraswap: from
when every request has its first token to the end; transformers: a separate 1-token generate
is taken as its prefill phase). Each measurement follows an untimed 4-token run at the same batch
(allocator, kernel selection). Targets (bench/targets.py), each a ratio within this process:
- batch-1 decode vs the weight-streaming bound: loraswap's batch-1 decode rate (after its first
  token) / (read bandwidth / (4 bytes x params)), the bandwidth re-measured right after the batch-1
  runs as bench/machine_limits.py does (the better of `x.sum()` and a matrix-vector product over
  512 MB, best of 5);
- batch-32 decode vs the compute bound: loraswap's batch-32 decode rate after prefill (its best
  mode) / (2048^3 matmul FLOP/s / (2 x params)), the matmul rate re-measured right after the
  batch-32 runs (batch 16 in --quick, labelled so);
- compiled vs eager at batch 32: loraswap `--compile` / loraswap eager, the decode rates after
  prefill (what compiling speeds up: the decode step), both at max_num_seqs 32; the whole-run ratio
  (prefill included) is reported next to it (not in --quick: no compile there).
`--limits FILE` (bench/machine_limits.py's results) adds the fractions against that file's bounds
when the file exists (informational).

    .venv/bin/python bench/engine_compare.py [--quick] [--out FILE] [--limits FILE]
    (full: about 4-5 minutes on 2 cores; --quick: eager only, batch 1 and 16, 16 tokens, under 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import NEW_TOKENS, QUICK_NEW_TOKENS, chat_prompts, model_dir, write
from bench.machine_limits import compute_bound_now, streaming_bound_now
from bench.servers import die_with_parent, stop_group
from bench.targets import target_row

NAME = "engine_compare"
MAX_LEN = 128  # prompts <= 40 tokens + 64 new; two attention windows (64, 128) to compile
EAGER_ROWS = 32  # the eager engine's max_num_seqs (the largest batch)
BATCHES = [1, 8, 32]
QUICK_BATCHES = [1, 16]  # --quick: the targets are then reported at batch 16
COMPILE_BATCHES = [32]
HF_COMPILE_LIMIT_S = 150  # compile + first generate in the child; beyond it: reported as a timeout
HF_TIMED_CALL_LIMIT_S = 300
WARM_TOKENS = 4
TARGET_RATIO = 4.0  # loraswap / transformers, same mode (an older target, not issue 17's)


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


# ---- loraswap ---------------------------------------------------------------------------------
def build_engine(tok: Any, *, rows: int, compile: bool) -> tuple[Any, float]:
    from server.engine import Engine
    from server.runner import ModelRunner
    from server.weights import build_model

    model = build_model(model_dir(), dtype=torch.float32, device="cpu", max_rows=rows, max_len=MAX_LEN)
    engine = Engine(ModelRunner(model, None, compile=compile), eos_ids=frozenset(), max_waiting=4096)
    start = time.perf_counter()
    engine.runner.warm_up()  # compiles every decode graph (no-op when eager)
    return engine, time.perf_counter() - start


def run_engine(engine: Any, ids: list[list[int]], new_tokens: int, tag: str) -> dict[str, Any]:
    """Submit every prompt at once, step until idle. Generated tokens, wall seconds, seconds until
    every request had its first token (the prefill phase; early requests already decode during
    it), and the decode rate after it."""
    from server.sampling import SamplingParams
    from server.sequence import GenerationRequest

    events: list[tuple[float, int, int]] = []  # (time, request, tokens)
    errors: list[str] = []

    def sink_for(i: int) -> Any:
        def sink(event: Any) -> None:
            if event.token_ids:
                events.append((time.perf_counter(), i, len(event.token_ids)))
            if event.error is not None:
                errors.append(event.error)

        return sink

    start = time.perf_counter()
    for i, prompt in enumerate(ids):
        request = GenerationRequest(f"{tag}-{i}", prompt, max_tokens=new_tokens,
                                    sampling=SamplingParams(temperature=0), ignore_eos=True)
        engine.submit(request, sink_for(i))
    engine.run_until_idle()
    end = time.perf_counter()
    if errors:
        raise RuntimeError(f"loraswap request failed: {errors[0]}")
    tokens = sum(n for _, _, n in events)
    if tokens != new_tokens * len(ids):
        raise RuntimeError(f"loraswap generated {tokens} tokens, expected {new_tokens * len(ids)}")
    first: dict[int, float] = {}
    for t, i, _ in events:
        first.setdefault(i, t)
    all_first = max(first.values())
    after = sum(n for t, _, n in events if t > all_first)
    return {"tokens": tokens, "seconds": end - start, "prefill_s": all_first - start,
            "decode_tokens_per_s": after / (end - all_first) if after else None}


def measure_loraswap(engine: Any, tok: Any, batch: int, new_tokens: int, mode: str) -> dict[str, Any]:
    ids = chat_prompts(tok, batch)
    run_engine(engine, ids, WARM_TOKENS, f"warm{batch}")
    run = run_engine(engine, ids, new_tokens, f"b{batch}")
    decode = run["decode_tokens_per_s"]
    row = {"system": "loraswap", "mode": mode, "batch": batch, "new_tokens": new_tokens,
           "prompt_tokens": sum(map(len, ids)), "generated_tokens": run["tokens"], "seconds": round(run["seconds"], 3),
           "tokens_per_s": round(run["tokens"] / run["seconds"], 2), "prefill_s": round(run["prefill_s"], 3),
           "decode_tokens_per_s": None if decode is None else round(decode, 2)}
    print(f"loraswap     {mode:8s} batch {batch:3d}: {row['tokens_per_s']:8.2f} tok/s ({run['tokens']} tokens in "
          f"{run['seconds']:.1f} s; prefill phase {run['prefill_s']:.1f} s, then {row['decode_tokens_per_s']} tok/s)", flush=True)
    return row


# ---- transformers -------------------------------------------------------------------------------
def hf_model() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()


def left_padded(tok: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids = chat_prompts(tok, batch)
    pad = tok.convert_tokens_to_ids("<|im_end|>")
    width = max(map(len, ids))
    input_ids = torch.full((batch, width), pad, dtype=torch.int64)
    mask = torch.zeros((batch, width), dtype=torch.int64)
    for i, p in enumerate(ids):
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return input_ids, mask, pad


def hf_generate(model: Any, tok: Any, batch: int, new_tokens: int, **kwargs: Any) -> tuple[int, float]:
    input_ids, mask, pad = left_padded(tok, batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=pad, **kwargs)
    elapsed = time.perf_counter() - start
    generated = out.shape[1] - input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"transformers generated {generated} tokens per row, expected {new_tokens}")
    return generated * batch, elapsed


def hf_row(mode: str, batch: int, new_tokens: int, tokens: int, elapsed: float, prompt_tokens: int,
           prefill_s: float | None = None) -> dict[str, Any]:
    decode = None
    if prefill_s is not None and new_tokens > 1 and elapsed > prefill_s:
        decode = round(batch * (new_tokens - 1) / (elapsed - prefill_s), 2)
    row = {"system": "transformers", "mode": mode, "batch": batch, "new_tokens": new_tokens,
           "prompt_tokens": prompt_tokens, "generated_tokens": tokens, "seconds": round(elapsed, 3),
           "tokens_per_s": round(tokens / elapsed, 2),
           "prefill_s": None if prefill_s is None else round(prefill_s, 3), "decode_tokens_per_s": decode}
    print(f"transformers {mode:8s} batch {batch:3d}: {row['tokens_per_s']:8.2f} tok/s ({tokens} tokens in {elapsed:.1f} s"
          + (f"; prefill {prefill_s:.1f} s, then {decode} tok/s)" if prefill_s is not None else ")"), flush=True)
    return row


def measure_hf(model: Any, tok: Any, batch: int, new_tokens: int) -> dict[str, Any]:
    hf_generate(model, tok, batch, WARM_TOKENS)
    _, prefill_s = hf_generate(model, tok, batch, 1)  # the prefill phase: prompt forward + first token
    tokens, elapsed = hf_generate(model, tok, batch, new_tokens)
    return hf_row("eager", batch, new_tokens, tokens, elapsed, sum(map(len, chat_prompts(tok, batch))), prefill_s)


def hf_compile_child(batch: int, new_tokens: int) -> None:
    """Runs in a child process: compile (first call, timed) then one timed call; prints RESULT json."""
    from transformers import CompileConfig

    torch.set_num_threads(os.cpu_count() or 1)
    tok = tokenizer()
    model = hf_model()
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    kwargs = {"cache_implementation": "static", "compile_config": config}
    from torch._dynamo.utils import counters

    _, first = hf_generate(model, tok, batch, new_tokens, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled (first call) in {first:.1f} s, {graphs} graphs", flush=True)
    tokens, elapsed = hf_generate(model, tok, batch, new_tokens, **kwargs)
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": elapsed, "first_call_s": first, "graphs": graphs,
                                  "graphs_compiled_in_timed_call": counters["stats"]["unique_graphs"] - graphs}), flush=True)


def measure_hf_compiled(batch: int, new_tokens: int, limit_s: int, prompt_tokens: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The compiled generate in a child process: (row or None, what happened). The compile (with the
    first call) gets `limit_s`; the timed call after it gets HF_TIMED_CALL_LIMIT_S."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-compile-child", str(batch), str(new_tokens)]
    # Its own session (the inductor compile workers too), and it dies with this process.
    proc = subprocess.Popen(die_with_parent(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines: list[str] = []
        compiled = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("compiled "):
                    compiled.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = time.perf_counter()
        stage = "compile + first generate"
        while not compiled.wait(0.5):
            if proc.poll() is not None or time.perf_counter() - start > limit_s:
                break
        try:
            if not compiled.is_set() and proc.poll() is None:
                raise subprocess.TimeoutExpired(cmd, limit_s)
            stage = "timed generate"
            proc.wait(timeout=HF_TIMED_CALL_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its inductor compile workers
            proc.wait()
            reader.join(5)
            limit = limit_s if stage.startswith("compile") else HF_TIMED_CALL_LIMIT_S
            print(f"transformers compile batch {batch}: {stage} timed out after {limit} s", flush=True)
            return None, {"status": "timeout", "stage": stage, "limit_s": limit,
                          "detail": f"{stage} did not finish within {limit} s", "log_tail": "\n".join(lines[-8:])[-1500:]}
        reader.join(5)
        wall = time.perf_counter() - start
    finally:  # also on errors and SIGTERM: nothing of the child's group outlives this call
        stop_group(proc, grace=5.0)
    result = next((line[7:] for line in lines if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        tail = [line for line in lines if line.strip()]
        error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        print(f"transformers compile batch {batch}: failed (exit {proc.returncode}): {error}", flush=True)
        return None, {"status": "error", "exit_code": proc.returncode, "error": error, "log_tail": "\n".join(tail[-30:])[-3000:]}
    data = json.loads(result)
    row = hf_row("compile", batch, new_tokens, data["tokens"], data["seconds"], prompt_tokens)
    row.update(first_call_s=round(data["first_call_s"], 1), graphs=data["graphs"],
               graphs_compiled_in_timed_call=data["graphs_compiled_in_timed_call"])
    return row, {"status": "ok", "first_call_s": round(data["first_call_s"], 1), "child_wall_s": round(wall, 1),
                 "graphs": data["graphs"], "graphs_compiled_in_timed_call": data["graphs_compiled_in_timed_call"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="eager only, QUICK_NEW_TOKENS per request")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/engine_compare[_quick].json)")
    parser.add_argument("--limits", type=Path, default=None, help="bench/machine_limits.py results, for the fraction of its compute bound")
    parser.add_argument("--hf-compile-limit", type=int, default=HF_COMPILE_LIMIT_S, help="seconds for transformers' compile + first call")
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=BATCHES,
                        help="comma-separated batch sizes (default 1,8,32, or 1,16 with --quick; the targets use the largest)")
    parser.add_argument("--compile-batches", type=lambda v: [int(b) for b in v.split(",") if b], default=None,
                        help="batch sizes to also run compiled (default 32; none with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help=f"per request (default {NEW_TOKENS}; {QUICK_NEW_TOKENS} with --quick)")
    parser.add_argument("--hf-compile-child", nargs=2, type=int, metavar=("BATCH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_compile_child:
        hf_compile_child(*args.hf_compile_child)
        return
    # A SIGTERM (from run_all, make or a person) unwinds normally, so the compile child is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or ROOT / "bench" / "results" / f"{NAME}{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else NEW_TOKENS)
    # --quick keeps the ends (batch 1, and 32 for the targets) unless --batches says otherwise.
    batches = sorted(args.batches if args.batches is not BATCHES or not args.quick else QUICK_BATCHES)
    compile_batches = args.compile_batches if args.compile_batches is not None else ([] if args.quick else COMPILE_BATCHES)
    started = time.perf_counter()
    tok = tokenizer()
    rows: list[dict[str, Any]] = []
    engine, _ = build_engine(tok, rows=max(EAGER_ROWS, *batches), compile=False)
    model = hf_model()
    bound: dict[str, float] = {}
    stream_bound: dict[str, float] = {}
    for batch in batches:  # the two systems back to back at each batch: same machine load
        rows.append(measure_loraswap(engine, tok, batch, new_tokens, "eager"))
        rows.append(measure_hf(model, tok, batch, new_tokens))
        if batch == 1:
            stream_bound = streaming_bound_now()
            print(f"weight-streaming bound (this run): {stream_bound['streaming_bound_tokens_per_s']} tok/s at "
                  f"{stream_bound['bandwidth_gb_s']} GB/s", flush=True)
        if batch == max(batches):
            bound = compute_bound_now()
            print(f"compute bound (this run): {bound['compute_bound_tokens_per_s']} tok/s at {bound['matmul_gflops']} GFLOP/s",
                  flush=True)
    del engine, model

    compile_info: dict[str, Any] = {}
    for batch in compile_batches:
        engine, warm_s = build_engine(tok, rows=batch, compile=True)
        print(f"loraswap --compile warm-up (max_num_seqs {batch}, max_model_len {MAX_LEN}): {warm_s:.1f} s, "
              f"{engine.runner.compile_counter.graphs} graphs", flush=True)
        row = measure_loraswap(engine, tok, batch, new_tokens, "compile")
        row.update(warm_up_s=round(warm_s, 1), graphs=engine.runner.compile_counter.graphs,
                   recompilations=engine.runner.recompilations)
        rows.append(row)
        del engine
        hf, info = measure_hf_compiled(batch, new_tokens, args.hf_compile_limit, row["prompt_tokens"])
        compile_info[str(batch)] = {"loraswap_warm_up_s": row["warm_up_s"], "loraswap_graphs": row["graphs"],
                                    "loraswap_recompilations": row["recompilations"], "transformers": info}
        if hf is not None:
            rows.append(hf)
        else:  # reported instead of the number
            detail = info.get("error") or info.get("detail")
            rows.append({"system": "transformers", "mode": "compile", "batch": batch, "status": info["status"],
                         "error": f"transformers compiled generate at batch {batch}: {info['status']}: {detail}"})

    measured = [r for r in rows if "tokens_per_s" in r]
    speed = {(r["system"], r["mode"], r["batch"]): r["tokens_per_s"] for r in measured}
    decode = {(r["system"], r["mode"], r["batch"]): r.get("decode_tokens_per_s") for r in measured}
    for r in rows:  # loraswap / transformers in the same mode and batch
        other = speed.get(("transformers", r["mode"], r["batch"]))
        if r["system"] == "loraswap" and other:
            r["vs_transformers"] = round(r["tokens_per_s"] / other, 2)

    def best(system: str, batch: int) -> tuple[float, str] | None:
        found = [(v, mode) for (s, mode, b), v in speed.items() if s == system and b == batch]
        return max(found) if found else None

    top = max(batches)
    ours, theirs = best("loraswap", top), best("transformers", top)
    summary: dict[str, Any] = {
        "new_tokens": new_tokens, "batches": batches, "max_model_len": MAX_LEN, "eager_max_num_seqs": max(EAGER_ROWS, *batches),
        "loraswap_tokens_per_s": {str(b): speed[("loraswap", "eager", b)] for b in batches},
        "transformers_tokens_per_s": {str(b): speed[("transformers", "eager", b)] for b in batches},
        "ratio_loraswap_vs_transformers": {str(b): round(speed[("loraswap", "eager", b)] / speed[("transformers", "eager", b)], 2)
                                           for b in batches},
        "loraswap_decode_tokens_per_s": {str(b): decode[("loraswap", "eager", b)] for b in batches},
        "transformers_decode_tokens_per_s": {str(b): decode[("transformers", "eager", b)] for b in batches},
        "compile": compile_info,
    }
    for b in compile_batches:
        if ("loraswap", "compile", b) in speed:
            summary.setdefault("loraswap_compile_tokens_per_s", {})[str(b)] = speed[("loraswap", "compile", b)]
        if ("transformers", "compile", b) in speed:
            summary.setdefault("transformers_compile_tokens_per_s", {})[str(b)] = speed[("transformers", "compile", b)]
            summary.setdefault("ratio_compile_vs_compile", {})[str(b)] = round(
                speed[("loraswap", "compile", b)] / speed[("transformers", "compile", b)], 2)
    assert ours is not None and theirs is not None
    # Informational only: each side's fastest mode at the largest batch (possibly different modes).
    # The ratio target compares the same mode on both sides (below).
    best_ratio = round(ours[0] / theirs[0], 2)
    summary[f"best_batch{top}"] = {"loraswap": {"tokens_per_s": ours[0], "mode": ours[1]},
                                   "transformers": {"tokens_per_s": theirs[0], "mode": theirs[1]},
                                   "ratio": best_ratio}
    summary[f"ratio_best_vs_best_batch{top}"] = best_ratio
    # Against the compute bound: the decode rate once every request has its first token (the bound
    # counts generated tokens only; prompt tokens are work too), loraswap's best mode at this batch.
    # The target uses the bound measured in this run (a ratio within one run); --limits adds the
    # fraction of the machine_limits file's bound.
    decode_top = max(((v, m) for (sys_, m, b), v in decode.items() if sys_ == "loraswap" and b == top and v is not None),
                     default=(ours[0], ours[1] + ", whole run"))
    summary[f"decode_batch{top}"] = {"loraswap_tokens_per_s": decode_top[0], "mode": decode_top[1]}
    fraction = decode_top[0] / bound["compute_bound_tokens_per_s"]
    summary.update(matmul_gflops_this_run=bound["matmul_gflops"],
                   compute_bound_tokens_per_s_this_run=bound["compute_bound_tokens_per_s"],
                   fraction_of_compute_bound_this_run=round(fraction, 3))
    # batch 1: the decode rate after the first token (the whole run's rate if it had no other token)
    b1_decode = decode.get(("loraswap", "eager", 1)) or speed.get(("loraswap", "eager", 1))
    if args.limits is not None and not args.limits.is_file():  # machine_limits failed or did not run
        print(f"no limits file at {args.limits}: skipping the fractions of its bounds", flush=True)
    elif args.limits is not None:
        limits = json.loads(args.limits.read_text())["summary"]
        summary["limits_file"] = str(args.limits)
        summary["compute_bound_tokens_per_s"] = limits["bound_tokens_per_s_compute"]
        summary["fraction_of_compute_bound"] = round(decode_top[0] / limits["bound_tokens_per_s_compute"], 3)
        if ("loraswap", "eager", 1) in speed:
            summary["batch1_bound_tokens_per_s"] = limits["bound_tokens_per_s_batch1"]
            summary["fraction_of_batch1_bound"] = round(b1_decode / limits["bound_tokens_per_s_batch1"], 3)
    summary["targets"] = []
    if stream_bound:  # batch 1 ran
        b1_fraction = b1_decode / stream_bound["streaming_bound_tokens_per_s"]
        summary.update(bandwidth_gb_s_this_run=stream_bound["bandwidth_gb_s"],
                       streaming_bound_tokens_per_s_this_run=stream_bound["streaming_bound_tokens_per_s"],
                       batch1_decode_tokens_per_s=b1_decode,
                       fraction_of_streaming_bound_this_run=round(b1_fraction, 3))
        summary["targets"].append(target_row("batch1_vs_streaming_bound", round(b1_fraction, 3)))
    else:
        summary["targets"].append(target_row("batch1_vs_streaming_bound", None, why="batch 1 not run (--batches)"))
    summary["targets"].append(target_row(
        "batch32_vs_compute_bound", round(fraction, 3),
        f"batch-{top} decode tokens/s (loraswap {decode_top[1]}, after prefill) / compute bound measured in this run"))
    if ("loraswap", "compile", top) in speed and top == 32:  # issue 17's target is at batch 32
        whole = speed[("loraswap", "compile", top)] / speed[("loraswap", "eager", top)]
        summary["compiled_vs_eager_batch32_whole_run"] = round(whole, 2)
        compiled, eager = decode.get(("loraswap", "compile", top)), decode.get(("loraswap", "eager", top))
        gain = round(compiled / eager, 2) if compiled and eager else None
        summary["compiled_vs_eager_batch32"] = gain
        summary["targets"].append(target_row(
            "compiled_vs_eager_batch32", gain, "batch-32 decode tokens/s after prefill, loraswap compiled / eager "
            f"(whole run, prefill included: {whole:.2f}x)"))
    else:
        summary["targets"].append(target_row("compiled_vs_eager_batch32", None, why=(
            "no compiled run in --quick" if args.quick else "no compiled run at batch 32 (--batches, --compile-batches)")))
    # The ratio target: the same mode on both sides; eager always, compiled where both ran.
    for mode, label in (("eager", "eager"), ("compile", "compiled")):
        if ("loraswap", mode, top) in speed and ("transformers", mode, top) in speed:
            ratio = speed[("loraswap", mode, top)] / speed[("transformers", mode, top)]
            summary["targets"].append(
                {"metric": f"batch-{top} loraswap {label} / transformers generate {label}",
                 "value": round(ratio, 2), "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO})
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    for t in summary["targets"]:
        state = f"not measured: {t.get('why')}" if t["value"] is None else "met" if t["met"] else "NOT met"
        print(f"target {t['metric']}: {t['value']} ({t['target']}): {state}", flush=True)
    write(out, NAME, rows, summary, quick=args.quick)


if __name__ == "__main__":
    main()
