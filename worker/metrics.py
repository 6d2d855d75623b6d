"""Prometheus metrics of one worker process, and the latency/SLO figures for ``stats``.

Names (also used by deploy/prometheus/alerts.yml and the Grafana dashboard):

* histograms: ``notifier_delivery_latency_seconds`` (event ``ts``, else first seen -> 250),
  ``notifier_queue_wait_seconds`` (-> fetched), ``notifier_smtp_seconds`` (the transaction)
* counters: ``notifier_delivered_total``, ``notifier_delivered_within_target_total``,
  ``notifier_retried_total{reason}``, ``notifier_dead_total{reason}``,
  ``notifier_suppressed_total``, ``notifier_digests_total``, ``notifier_held_total``,
  ``notifier_requeued_total{reason}``, ``notifier_duplicates_total``,
  ``notifier_fanned_out_total``, ``notifier_channel_outcomes_total{channel, outcome}``
* gauges: ``notifier_queue_depth``, ``notifier_retry_depth``, ``notifier_dead_depth``,
  ``notifier_processing_depth``, ``notifier_inflight_sends``, ``notifier_smtp_connections``,
  ``notifier_smtp_paused``, ``notifier_latency_target_seconds``, ``notifier_held_depth``,
  ``notifier_smtp_account_available{account}``
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .settings import SettingsError

__all__ = ["BUCKETS", "LatencySummary", "Metrics", "percentile", "summarize"]

# Sub-second resolution where it matters (5 ms ... 10 s).
BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
)
RETRY_REASONS = ("transient", "throttled")
DEAD_REASONS = ("permanent", "invalid", "exhausted", "expired", "internal")


class Metrics:
    def __init__(self, latency_target_s: float, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.target = latency_target_s
        self.latency = Histogram(
            "notifier_delivery_latency_seconds",
            "End-to-end: event produced (ts, else first seen) to 250 after DATA",
            buckets=BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "notifier_queue_wait_seconds",
            "Event produced to fetched by a worker",
            buckets=BUCKETS,
            registry=r,
        )
        self.smtp = Histogram(
            "notifier_smtp_seconds",
            "SMTP transaction (incl. reconnect when needed)",
            buckets=BUCKETS,
            registry=r,
        )
        self.delivered = Counter("notifier_delivered", "Events accepted by SMTP", registry=r)
        self.within_target = Counter(
            "notifier_delivered_within_target",
            "Events delivered within LATENCY_TARGET_S",
            registry=r,
        )
        self.retried = Counter("notifier_retried", "Retries scheduled", ["reason"], registry=r)
        self.dead = Counter("notifier_dead", "Events dead-lettered", ["reason"], registry=r)
        for reason in RETRY_REASONS:
            self.retried.labels(reason)
        for reason in DEAD_REASONS:
            self.dead.labels(reason)
        self.suppressed = Counter(
            "notifier_suppressed", "Repeats suppressed by dedup_key windows", registry=r
        )
        self.digests = Counter(
            "notifier_digests", "Digest mails sent (rate limit reached)", registry=r
        )
        self.held = Counter("notifier_held", "Events held for a digest", registry=r)
        self.channel_outcomes = Counter(
            "notifier_channel_outcomes",
            "Outcomes per channel (an SMTP account, or a channel of CHANNELS_FILE)",
            ["channel", "outcome"],
            registry=r,
        )
        self.fanned_out = Counter(
            "notifier_fanned_out", "Events split into one delivery per channel", registry=r
        )
        self.requeued = Counter(
            "notifier_requeued",
            "Events returned to the queue unchanged (configuration pause, fenced)",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "notifier_duplicates", "Repeats of a delivered id dropped", registry=r
        )
        self.held_depth = Gauge("notifier_held_depth", "Events held for a digest", registry=r)
        self.account_up = Gauge(
            "notifier_smtp_account_available",
            "1 while an SMTP account is usable",
            ["account"],
            registry=r,
        )
        self.queue_depth = Gauge("notifier_queue_depth", "Events waiting in the queue", registry=r)
        self.retry_depth = Gauge("notifier_retry_depth", "Events waiting for a retry", registry=r)
        self.dead_depth = Gauge("notifier_dead_depth", "Dead letters", registry=r)
        self.processing_depth = Gauge(
            "notifier_processing_depth", "Events held by all workers", registry=r
        )
        self.inflight = Gauge("notifier_inflight_sends", "Sends in progress here", registry=r)
        self.connections = Gauge(
            "notifier_smtp_connections", "Open SMTP connections here", registry=r
        )
        self.paused = Gauge(
            "notifier_smtp_paused", "1 while paused on an SMTP configuration error", registry=r
        )
        # liveness of watched strategies (NOTIFIER_WATCH_FILE); labels: watched strategies only
        self.strategy_last_seen = Gauge(
            "notifier_strategy_last_seen_timestamp_seconds",
            "Unix time of a watched strategy's last sign of life (heartbeat or event)",
            ["strategy"],
            registry=r,
        )
        self.strategy_silent = Gauge(
            "notifier_strategy_silent",
            "1 while a watched strategy is in a silence episode ([SILENT] sent, not recovered)",
            ["strategy"],
            registry=r,
        )
        Gauge("notifier_latency_target_seconds", "LATENCY_TARGET_S", registry=r).set(
            latency_target_s
        )

    def observe_delivery(self, latency: float, queue_wait: float, smtp: float) -> None:
        self.latency.observe(latency)
        self.queue_wait.observe(queue_wait)
        self.smtp.observe(smtp)
        self.delivered.inc()
        if latency <= self.target:
            self.within_target.inc()

    def serve(self, host: str, port: int) -> Any:
        """Start the /metrics HTTP endpoint (port 0 disables); returns the server or None.
        SettingsError (one line naming the setting) when it cannot listen there."""
        if port == 0:
            return None
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except socket.gaierror as exc:
            raise SettingsError(
                f"NOTIFIER_METRICS_HOST: {host!r} is not an address of this host ({exc.strerror});"
                " use 127.0.0.1 (Prometheus on this host) or 0.0.0.0"
            ) from None
        except OSError as exc:
            where = f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise SettingsError(
                    f"NOTIFIER_METRICS_PORT: {where} is already in use (another notifier worker?);"
                    " give each worker its own port (the template unit notifier@N adds N through"
                    " NOTIFIER_METRICS_PORT_OFFSET); 0 turns /metrics off"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SettingsError(
                    f"NOTIFIER_METRICS_HOST: {host!r} is not an address of this host; use "
                    "127.0.0.1 (Prometheus on this host) or 0.0.0.0"
                ) from None
            raise SettingsError(
                f"NOTIFIER_METRICS_PORT: cannot listen on {where} ({exc.strerror}); use a port "
                "above 1023 that is free, or 0 to turn /metrics off"
            ) from None
        return server


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float
    within_target: float  # share in 0..1 (NaN when count == 0)
    target: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50_s": self.p50,
            "p95_s": self.p95,
            "p99_s": self.p99,
            "max_s": self.max,
            "mean_s": self.mean,
            "within_target": self.within_target,
            "target_s": self.target,
        }

    def line(self) -> str:
        if not self.count:
            return "no deliveries"
        return (
            f"{self.count} delivered: p50 {self.p50 * 1000:.1f} ms, p95 {self.p95 * 1000:.1f} ms,"
            f" p99 {self.p99 * 1000:.1f} ms, max {self.max * 1000:.1f} ms;"
            f" {self.within_target * 100:.1f}% within {self.target:g} s"
        )


def summarize(latencies: Sequence[float], target: float) -> LatencySummary:
    values = sorted(latencies)
    n = len(values)
    if not n:
        return LatencySummary(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, target)
    return LatencySummary(
        count=n,
        p50=percentile(values, 50),
        p95=percentile(values, 95),
        p99=percentile(values, 99),
        max=values[-1],
        mean=sum(values) / n,
        within_target=sum(1 for v in values if v <= target) / n,
        target=target,
    )
