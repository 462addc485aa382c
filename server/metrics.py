"""Prometheus metrics and the per-request log line.

Two sources. Per-request events (tokens, latencies, how a request ended) are pushed by a
`RequestTracker` that the CompletionService creates for each engine request and feeds on the
event loop, with the times the engine stamped on its events. Engine state (queue, rows, slots,
compile graphs, the adapter CPU cache) is pulled at scrape time from the service's `stats()` by
`EngineCollector`, so the engine loop does no metrics work. Every app has its own registry
(tests build many apps in one process). No HTTP and no tensors here; the service imports this
module, never the other way round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from adapters.catalog import key_name
from server.sequence import FinishReason, GenerationRequest

# What the collector reads at scrape time: the loaded service's stats(), or None while loading.
StatsSource = Callable[[], Mapping[str, object] | None]

request_log = logging.getLogger("loraswap.requests")

# How an engine request ended: its finish reason, or what cut it short.
RequestStatus = Literal["stop", "length", "error", "cancelled", "timeout"]

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# "abort": the engine cancelled the request because the service asked it to.
_STATUS_BY_REASON: dict[FinishReason, RequestStatus] = {"stop": "stop", "length": "length", "error": "error",
                                                        "abort": "cancelled"}


def finish_status(reason: FinishReason | None) -> RequestStatus:
    return "cancelled" if reason is None else _STATUS_BY_REASON[reason]


def _number(value: object) -> float:
    """A value of Engine.stats() (typed `object` there) as a sample value."""
    assert isinstance(value, (int, float)), value
    return float(value)


class ServerMetrics:
    """The metrics of one app. `stats` returns the loaded service's counters, or None while
    the model loads (engine metrics are then left out)."""

    def __init__(self, stats: StatsSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # `model` is what clients put in the `model` field: the served base name or an adapter
        # name (bounded: the catalog's names). Histograms are unlabelled to keep series few.
        self.requests = Counter("loraswap_requests", "Finished engine requests (one per choice) by model and status "
                                "(stop, length, error, cancelled, timeout).", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens prefilled, by model.", ["model"], registry=r)
        self.generation_tokens = Counter("loraswap_generation_tokens", "Tokens generated and delivered, by model.",
                                         ["model"], registry=r)
        self.ttft = Histogram("loraswap_time_to_first_token_seconds", "Submission to first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loraswap_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.latency = Histogram("loraswap_request_latency_seconds", "Submission to the end of the request.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load = Histogram("loraswap_adapter_load_seconds", "Adapter loads: tier=disk (read and validate "
                                      "into the CPU cache), tier=slot (write into a device slot).", ["tier"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.http_requests = Counter("loraswap_http_requests", "HTTP requests by route template and status code.",
                                     ["route", "code"], registry=r)
        r.register(EngineCollector(stats))
        # Hooks the engine and the catalog are built with (seconds per load).
        self.observe_slot_load = self.adapter_load.labels("slot").observe
        self.observe_disk_load = self.adapter_load.labels("disk").observe

    def track(self, request: GenerationRequest, base_name: str) -> RequestTracker:
        model = request.label(base_name, key_name)
        return RequestTracker(self, request.request_id, model, len(request.prompt_ids))

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """One engine request's timeline, fed on the event loop: `on_tokens` per engine event (with
    the time the engine produced it), `finish` once. Tokens after `finish` (a cancelled
    request's last ones) are not counted: the client never got them."""

    def __init__(self, metrics: ServerMetrics, request_id: str, model: str, prompt_tokens: int) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token = 0.0
        self.generated = 0
        self.done = False
        # Label children looked up once: on_tokens runs per token.
        self._prompt_tokens = metrics.prompt_tokens.labels(model)
        self._generation_tokens = metrics.generation_tokens.labels(model)

    def on_tokens(self, count: int, now: float) -> None:
        """`count` tokens the engine produced at `now` (time.monotonic())."""
        if not count or self.done:
            return
        m = self.metrics
        if self.first_token is None:
            self.first_token = now
            m.ttft.observe(max(0.0, now - self.start))
            self._prompt_tokens.inc(self.prompt_tokens)  # the prefill is complete
        else:
            m.itl.observe(max(0.0, now - self.last_token) / count)
        self.last_token = now
        self.generated += count
        self._generation_tokens.inc(count)

    def finish(self, status: RequestStatus) -> None:
        """Count the request and write its log line (idempotent)."""
        if self.done:
            return
        self.done = True
        generated, first_token = self.generated, self.first_token
        latency = time.monotonic() - self.start
        self.metrics.requests.labels(self.model, status).inc()
        self.metrics.latency.observe(latency)
        request_log.log(
            logging.WARNING if status == "error" else logging.INFO,
            "request finished",
            extra={
                "request_id": self.request_id,
                "model": self.model,
                "status": status,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": generated,
                "ttft_ms": None if first_token is None else round((first_token - self.start) * 1000, 1),
                "latency_ms": round(latency * 1000, 1),
            },
        )


class EngineCollector:
    """Gauges and counters read at scrape time from the service's `stats()`: the engine's
    snapshot and the adapter CPU cache."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # names vary with the engine's configuration; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("loraswap_model_ready", "1 once the model is loaded and serving.",
                                value=0 if stats is None else 1)
        if stats is None:
            return
        # Each also under vLLM's name: what a Kubernetes inference gateway's endpoint picker reads.
        for prefix in ("loraswap_", "vllm:"):
            yield GaugeMetricFamily(f"{prefix}num_requests_running", "Requests admitted (holding a row and KV blocks).",
                                    value=_number(stats["running"]))
            yield GaugeMetricFamily(f"{prefix}num_requests_waiting", "Requests submitted and not yet admitted.",
                                    value=_number(stats["waiting"]))
        compile_stats = stats["compile"]
        assert isinstance(compile_stats, dict)
        yield GaugeMetricFamily("loraswap_compile_enabled", "1 when the model step is torch.compiled.",
                                value=_number(compile_stats["enabled"]))
        yield CounterMetricFamily("loraswap_compile_graphs", "Graphs torch.compile produced (warm-up included).",
                                  value=_number(compile_stats["graphs"]))
        yield CounterMetricFamily("loraswap_compile_recompilations", "Graphs compiled after warm-up.",
                                  value=_number(compile_stats["recompilations"]))
        cache = stats.get("adapter_cpu_cache")
        if isinstance(cache, Mapping):
            yield from _cache_metrics(_number(cache["hits"]), _number(cache["misses"]))
        slots = stats.get("slots")
        if isinstance(slots, dict):
            yield from _slot_metrics(slots)
        kv = stats.get("kv_cache")
        if isinstance(kv, dict):
            yield from _kv_metrics(kv)


def _kv_metrics(kv: dict[str, object]) -> Iterator[Metric]:
    total, used = _number(kv["blocks_total"]), _number(kv["blocks_used"])
    yield GaugeMetricFamily("loraswap_kv_cache_blocks_total", "Blocks in the paged KV cache.", value=total)
    yield GaugeMetricFamily("loraswap_kv_cache_blocks_used", "KV blocks held by running requests.", value=used)
    yield GaugeMetricFamily("loraswap_kv_cache_blocks_cached", "KV blocks findable by the prefix cache (held or not).",
                            value=_number(kv["blocks_cached"]))
    for name in ("loraswap_kv_cache_usage", "vllm:kv_cache_usage_perc"):
        yield GaugeMetricFamily(name, "Used KV blocks / total, from 0 to 1.", value=used / total if total else 0.0)
    yield CounterMetricFamily("loraswap_num_preemptions", "Requests preempted because the KV cache ran out.",
                              value=_number(kv["preemptions"]))
    queries, hits = kv["prefix_cache_queries"], kv["prefix_cache_hits"]
    assert isinstance(queries, dict) and isinstance(hits, dict)
    for metric, doc, values in (
        ("loraswap_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, by model.", queries),
        ("loraswap_prefix_cache_hits", "Prompt tokens found in the prefix cache, by model.", hits),
    ):
        family = CounterMetricFamily(metric, doc, labels=["model"])
        for name, value in sorted(values.items()):
            family.add_metric([str(name)], _number(value))
        yield family


def _cache_metrics(hits: float, misses: float) -> Iterator[Metric]:
    yield CounterMetricFamily("loraswap_adapter_cpu_cache_hits", "Adapter lookups served from the CPU cache.", value=hits)
    yield CounterMetricFamily("loraswap_adapter_cpu_cache_misses", "Adapter lookups read from disk.", value=misses)
    yield GaugeMetricFamily("loraswap_adapter_cpu_cache_hit_ratio", "hits / (hits + misses); 0 before any lookup.",
                            value=hits / (hits + misses) if hits + misses else 0.0)


def _slot_metrics(slots: dict[str, object]) -> Iterator[Metric]:
    refs = slots["references"]
    resident = slots["resident"]
    assert isinstance(refs, list) and isinstance(resident, dict)
    capacity = len(refs)
    yield GaugeMetricFamily("loraswap_lora_slots_capacity", "LoRA slots (--max-loras).", value=capacity)
    yield GaugeMetricFamily("loraswap_lora_slots_resident", "Slots holding an adapter.", value=len(resident))
    yield GaugeMetricFamily("loraswap_lora_slots_active", "Slots used by running requests.",
                            value=sum(1 for r in refs if r > 0))
    yield GaugeMetricFamily("loraswap_lora_slot_occupancy", "Resident slots / capacity.",
                            value=len(resident) / capacity if capacity else 0.0)
    for name, doc in (("loads", "Adapters written into a slot."), ("evictions", "Resident adapters replaced."),
                      ("hits", "Admissions that found their adapter resident."),
                      ("waits", "Admissions deferred: every slot busy with other adapters.")):
        yield CounterMetricFamily(f"loraswap_lora_slot_{name}", doc, value=_number(slots[name]))
    # The vLLM convention LoRA-aware routers read: one series whose labels describe the state,
    # its value the time of this reading. Built per scrape, so an old label set never lingers.
    running = sorted({key_name(key) for key, slot in resident.items() if refs[slot] > 0})
    waiting_keys = slots.get("waiting_adapters", [])
    assert isinstance(waiting_keys, list)
    labels = {
        "running_lora_adapters": ",".join(running),
        "waiting_lora_adapters": ",".join(sorted({key_name(key) for key in waiting_keys})),
        "max_lora": str(capacity),
    }
    now = time.time()
    for metric in ("vllm:lora_requests_info", "loraswap_lora_requests_info"):
        info = GaugeMetricFamily(metric, "Running and waiting LoRA adapters; value: time of the reading.",
                                 labels=list(labels))
        info.add_metric(list(labels.values()), now)
        yield info
