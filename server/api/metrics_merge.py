"""Several replicas' Prometheus pages as one, each sample labelled with its replica: what the Ray
ingress serves at /metrics, so one scrape sees every engine (and a gateway can route on the
per-replica `vllm:lora_requests_info`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Families:
    """The registry interface generate_latest reads: something with collect()."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_pages(pages: Mapping[str, str]) -> bytes:
    """{replica id: its /metrics text} -> one exposition page; every sample gets replica="<id>"
    (a label of that name already there is overwritten: the page's origin is what counts)."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            target.samples.extend(
                Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return generate_latest(_Families(list(merged.values())))  # type: ignore[arg-type]
