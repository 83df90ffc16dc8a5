"""Billing's own Prometheus metrics, declared once on a registry the service owns (names in the README)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class BillingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.scrapes = Counter(
            "billing_scrapes",
            "Reads of usage counters, by source (a gateway /metrics URL or the Prometheus API) and result.",
            ["source", "result"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "billing_last_successful_scrape_timestamp_seconds",
            "When each source was last read successfully (Unix time).",
            ["source"],
            registry=self.registry,
        )
        self.drift_tokens = Gauge(
            "billing_reconciliation_drift_tokens",
            "Tokens derived from counters minus tokens in the ledger, last reconciled period, per partner.",
            ["partner"],
            registry=self.registry,
        )
        self.drift_ratio = Gauge(
            "billing_reconciliation_drift_ratio",
            "|counter tokens - ledger tokens| / ledger tokens, last reconciled period, per partner.",
            ["partner"],
            registry=self.registry,
        )
        self.needing_review = Gauge(
            "billing_invoices_needing_review",
            "Closed invoices marked needs_review because reconciliation drift exceeded the threshold.",
            registry=self.registry,
        )
        self.invoices_closed = Counter(
            "billing_invoices_closed",
            "Invoices written by closing a period (a repeated close writes none).",
            registry=self.registry,
        )

    def scrape(self, source: str, ok: bool, at: float | None = None) -> None:
        self.scrapes.labels(source, "success" if ok else "error").inc()
        if ok and at is not None:
            self.last_success.labels(source).set(at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
