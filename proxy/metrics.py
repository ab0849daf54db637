"""Prometheus metrics: one proxy process's requests and latency by route and status and its batch
writer's queue, spool and drops (read at scrape time, so they cost nothing per call); and, read
from Postgres at each scrape, what the dashboard's overview and training pages show (each
policy's live version, the trainer's newest step and its metrics, queue depth, the live
version's reward). The trainer writes its steps to Postgres and the proxy exports them, so
Prometheus scrapes the proxy alone; every proxy process exports the same training figures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        yield CounterMetricFamily(
            "lightloop_writer_logprobs_refused",
            "Calls stored without their logprobs because these held NaN or infinity.",
            value=stats.logprobs_refused,
        )


# The training figures' gauges, by the column of the newest step they show.
STEP_GAUGES = {
    "lightloop_training_step": ("step", "The newest training step."),
    "lightloop_training_loss": ("loss", "The newest step's loss."),
    "lightloop_training_reward_mean": ("reward_mean", "The newest step's mean reward."),
    "lightloop_training_reward_std": ("reward_std", "The newest step's reward standard deviation."),
    "lightloop_training_tokens": ("n_tokens", "Tokens the newest step trained on."),
    "lightloop_training_step_seconds": ("seconds", "How long the newest step took."),
}


def training_metrics(figures: dict[str, list[dict[str, Any]]] | None) -> Iterator[Metric]:
    """Gauges from `store.stats.gauges` (None: Postgres did not answer this scrape)."""
    yield GaugeMetricFamily(
        "lightloop_stats_up",
        "1 when this scrape read the training figures from Postgres.",
        value=int(figures is not None),
    )
    if figures is None:
        return
    live = GaugeMetricFamily(
        "lightloop_policy_live_version", "Each policy's live version.", labels=["policy"]
    )
    for v in figures["live_versions"]:
        live.add_metric([v["policy"]], v["version"])
    yield live
    for name, (column, text) in STEP_GAUGES.items():
        gauge = GaugeMetricFamily(name, text, labels=["policy"])
        for step in figures["steps"]:
            if isinstance(step[column], int | float):
                gauge.add_metric([step["policy"]], step[column])
        yield gauge
    metric = GaugeMetricFamily(
        "lightloop_training_metric",
        "Every number the trainer reported for its newest step (grad_norm, kl_to_base, ...).",
        labels=["policy", "name"],
    )
    for step in figures["steps"]:
        for key, value in sorted((step["metrics"] or {}).items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                metric.add_metric([step["policy"], key], value)
    yield metric
    queue = GaugeMetricFamily(
        "lightloop_queue_rollouts",
        "Rollouts queued and running, per dataset and mode.",
        labels=["dataset", "mode", "state"],
    )
    for q in figures["queue"]:
        queue.add_metric([q["dataset"], q["mode"], "queued"], q["queued"])
        queue.add_metric([q["dataset"], q["mode"], "running"], q["running"])
    yield queue
    reward = GaugeMetricFamily(
        "lightloop_live_version_reward",
        "The live version's mean reward so far, per dataset and mode (train, val).",
        labels=["policy", "dataset", "mode"],
    )
    for r in figures["live_rewards"]:
        for mode in ("train", "val"):
            if r[f"{mode}_reward"] is not None:
                reward.add_metric([r["policy"], r["dataset"], mode], r[f"{mode}_reward"])
    yield reward


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


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
        # Calls naming an agent (header or `policy/agent`) that has no adapter of its own under
        # a policy that gives some agents one: served by the policy's adapter, and counted here.
        self.unknown_agents = Counter(
            "lightloop_proxy_unknown_agent_calls",
            "Calls by an agent not configured under a policy with agent adapters, by policy.",
            ["policy"],
            registry=self.registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, figures: dict[str, list[dict[str, Any]]] | None) -> bytes:
        """The process's own metrics and this scrape's training figures, in one exposition."""
        scrape = CollectorRegistry()
        scrape.register(_Snapshot([*self.registry.collect(), *training_metrics(figures)]))
        return generate_latest(scrape)
