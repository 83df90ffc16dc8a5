"""Every Prometheus metric the gateway exports, declared once on a registry the gateway owns.

Labels stay bounded (model, operation, status); partner ids appear only on the usage counters that
billing reads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serving_requests_total",
            "Requests finished, by model, operation and final status.",
            ["model", "operation", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serving_request_duration_seconds",
            "Time from admission to the last byte of the response.",
            ["model", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "serving_requests_in_flight",
            "Requests admitted and not yet finished.",
            ["operation"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "serving_queue_wait_seconds",
            "Time admitted requests waited in the fair queue for a model slot.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.quota_rejections = Counter(
            "serving_quota_rejections_total",
            "Requests rejected by a quota limit, by the limit that rejected them.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.quota_fail_open = Counter(
            "serving_quota_fail_open_total",
            "Requests admitted unreserved because the quota store was unreachable (fail-open policy).",
            registry=self.registry,
        )
        self.partner_requests = Counter(
            "serving_partner_requests_total",
            "Requests per partner (billing input).",
            ["partner", "model", "operation", "status"],
            registry=self.registry,
        )
        self.partner_tokens = Counter(
            "serving_partner_tokens_total",
            "Tokens per partner and direction (billing input).",
            ["partner", "model", "direction"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
