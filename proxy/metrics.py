"""Prometheus metrics of one proxy process: requests and latency by route and status, and the
batch writer's queue, spool and drops (read at scrape time, so they cost nothing per call)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lightloop.store import BatchWriter

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _WriterCollector(Collector):
    def __init__(self, writer: BatchWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Metric]:
        stats = self.writer.stats
        yield GaugeMetricFamily(
            "lightloop_writer_queue_rows",
            "Rows waiting in memory for the writer.",
            value=self.writer.queue_depth,
        )
        yield GaugeMetricFamily(
            "lightloop_writer_spool_bytes",
            "Bytes spooled on disk while Postgres was unavailable, not yet replayed.",
            value=self.writer.spool.pending_bytes(),
        )
        rows = CounterMetricFamily(
            "lightloop_writer_rows", "Rows by what became of them.", labels=["outcome"]
        )
        for outcome, value in (
            ("submitted", stats.rows_submitted),
            ("written", stats.rows_written),
            ("spooled", stats.rows_spooled),
            ("replayed", stats.rows_replayed),
            ("dropped", stats.rows_dropped),
            ("rejected", stats.rows_rejected),
        ):
            rows.add_metric([outcome], value)
        yield rows


class Metrics:
    def __init__(self, writer: BatchWriter) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lightloop_proxy_requests",
            "Requests by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lightloop_proxy_request_seconds",
            "Time from request to the end of the answer, by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.registry.register(_WriterCollector(writer))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
