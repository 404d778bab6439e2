"""merge_metrics: several workers' Prometheus text as one valid exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dns.workers import merge_metrics


def _worker_text(queries: int, gen: int, lat: list[float]) -> str:
    r = CollectorRegistry()
    c = Counter("corral_dns_queries", "Queries", ["qtype"], registry=r)
    c.labels("A").inc(queries)
    Gauge("corral_dns_generation", "Generation", registry=r).set(gen)
    h = Histogram("corral_dns_upstream_latency_seconds", "Latency", buckets=(0.01, 0.1), registry=r)
    for x in lat:
        h.observe(x)
    return generate_latest(r).decode()


def test_each_family_once_and_every_sample_labelled() -> None:
    out = merge_metrics({"0": _worker_text(3, 2, [0.005]), "1": _worker_text(4, 2, [0.05, 0.5])}).decode()
    assert out.count("# TYPE corral_dns_queries_total counter") == 1
    assert out.count("# HELP corral_dns_generation Generation") == 1
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    q = {s.labels["worker"]: s.value for s in fams["corral_dns_queries"].samples if s.name.endswith("_total")}
    assert q == {"0": 3.0, "1": 4.0}
    assert fams["corral_dns_queries"].type == "counter" and fams["corral_dns_generation"].type == "gauge"
    h = fams["corral_dns_upstream_latency_seconds"]
    assert h.type == "histogram"
    counts = {(s.labels["worker"], s.labels["le"]): s.value for s in h.samples if s.name.endswith("_bucket")}
    assert counts[("0", "0.01")] == 1 and counts[("1", "0.01")] == 0 and counts[("1", "+Inf")] == 2


def test_unreadable_worker_text_is_left_out() -> None:
    out = merge_metrics({"0": "this is { not prometheus", "1": _worker_text(5, 1, [])}).decode()
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    workers = {s.labels["worker"] for f in fams.values() for s in f.samples}
    assert workers == {"1"}


def test_no_workers_gives_an_empty_exposition() -> None:
    assert merge_metrics({}) == b""
