"""The billing service: reads counters (scraped or from Prometheus), closes periods, answers queries.

Closing a period: check that the counters are known past the period end (every target scraped after it),
read every series, derive usage, price it, reconcile with the ledger, then write every invoice, the
reconciliation rows and the period row in one transaction. Any failure before the commit (a source down,
a malformed page, a missing price, a crash) leaves nothing; closing again recomputes the same bytes. A
closed period is never recomputed: closing it again returns the stored documents.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from billing.counters import Series, bucket_usage
from billing.invoices import GrantBalance, Invoice, build_invoices
from billing.ledger import LedgerReader, PartnerPlans
from billing.metrics import BillingMetrics
from billing.periods import Period, iso
from billing.promapi import PrometheusClient
from billing.reconcile import Reconciliation, reconcile
from billing.retry import RetryPolicy
from billing.scrape import Scraper
from billing.settings import BillingSettings
from billing.store import BillingStore, StoredInvoice
from serving.commerce.credits import CreditStore
from serving.commerce.pricebook import PriceBook
from serving.storage.database import Database

log = logging.getLogger("billing.service")


class PeriodIncomplete(RuntimeError):
    """The counters are not yet known past the period end (or it has not ended): try again later."""


class BillingService:
    def __init__(self, settings: BillingSettings, metrics: BillingMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or BillingMetrics()
        self.http = httpx.Client(timeout=settings.http_timeout_s)
        self.store = BillingStore(Database(settings.db_url))
        self.book = PriceBook.load(settings.price_book)
        retry = RetryPolicy(settings.retry_attempts, settings.retry_backoff_s)
        self.scraper: Scraper | None = None
        self.prometheus: PrometheusClient | None = None
        if settings.mode == "scrape":
            self.scraper = Scraper(
                self.store, self.metrics, self.http, settings.targets(), settings.scrape_targets_file, retry
            )
        else:
            self.prometheus = PrometheusClient(
                settings.prometheus_url, self.http, retry, self.metrics, settings.prometheus_job
            )
        self._close_lock = threading.Lock()
        self._gateway_dbs: dict[str, Database] = {}  # PostgreSQL pools on the gateway's databases, opened on first use
        self._gateway_dbs_lock = threading.Lock()
        self.metrics.needing_review.set(self.store.needing_review())

    def shutdown(self) -> None:
        self.http.close()
        self.store.close()
        with self._gateway_dbs_lock:
            pools, self._gateway_dbs = list(self._gateway_dbs.values()), {}
        for db in pools:
            db.close()

    @contextmanager
    def _gateway_db(self, url: str) -> Iterator[Database]:
        """A read-only handle on one of the gateway's databases. A PostgreSQL pool stays open for the service's
        life (it reconnects by itself after an outage); a SQLite file is opened per use (cheap; it may appear later)."""
        if not url.startswith(("postgresql://", "postgres://")):
            db = Database(url, read_only=True)
            try:
                yield db
            finally:
                db.close()
            return
        with self._gateway_dbs_lock:
            pool = self._gateway_dbs.get(url)
            if pool is None:
                pool = self._gateway_dbs[url] = Database(url, read_only=True, max_connections=2)
        yield pool

    # -- reading the counters ------------------------------------------------------------------------
    def check_complete(self, period: Period) -> None:
        """Raises ``PeriodIncomplete`` unless every source's counters are known past the period end."""
        now = time.time()
        if now < period.end:
            raise PeriodIncomplete(f"period {period.id} ends at {iso(period.end)}: it has not ended yet")
        if self.scraper is not None:
            states = {state.source: state for state in self.store.targets()}
            targets = self.scraper.targets()
            if not targets:
                raise PeriodIncomplete("no scrape targets configured")
            for target in targets:
                state = states.get(target.source)
                if state is None or state.last_success is None or state.last_success < period.end:
                    error = f" (last error: {state.last_error})" if state and state.last_error else ""
                    raise PeriodIncomplete(f"{target.url} not scraped successfully since {iso(period.end)}{error}")
            return
        assert self.prometheus is not None
        oldest, down = self.prometheus.scraped_through(now)
        if down:
            raise PeriodIncomplete(f"Prometheus reports targets down: {', '.join(down)}")
        if oldest < period.end:
            raise PeriodIncomplete(f"Prometheus has not scraped every target since {iso(period.end)}")

    def series(self, period: Period) -> list[Series]:
        if self.scraper is not None:
            return self.store.series(period.start, period.end)
        assert self.prometheus is not None
        return self.prometheus.series(period.start, period.end, self.settings.prometheus_lookback_s)

    # -- computing -----------------------------------------------------------------------------------
    def _partners_db_exists(self) -> bool:
        url = self.settings.partners_db_url
        return url.startswith(("postgresql://", "postgres://")) or Path(url.removeprefix("sqlite:///")).exists()

    def _plans(self, before: float) -> dict[str, str]:
        if not self._partners_db_exists():
            return {}
        with self._gateway_db(self.settings.partners_db_url) as db:
            return PartnerPlans(db).plans(before)

    def _grants(self, period: Period) -> dict[str, list[GrantBalance]]:
        """Per partner, the credit grants usable in the period with what closed invoices of other periods left."""
        if not self._partners_db_exists():
            return {}
        with self._gateway_db(self.settings.partners_db_url) as db:
            credits = CreditStore(db)
            grants, drawn = credits.grants(), credits.drawn(except_period=period.id)
        usable: dict[str, list[GrantBalance]] = {}
        for grant in grants:  # in draw order
            available = grant.amount - drawn.get(grant.id, Decimal(0))
            if grant.covers(period.start, period.end) and available > 0:
                balance = GrantBalance(grant.id, grant.kind.value, grant.priority, available)
                usable.setdefault(grant.partner_id, []).append(balance)
        return usable

    def _record_draws(self, period: Period, invoices: list[Invoice]) -> None:
        """Writes which partners the period invoiced and what each invoice drew from each grant into the partner
        database, where gateways read balances, just before billing's own close commits: a close that fails after it
        leaves them, and the next close of the period replaces them (see ``CreditStore.record_close``)."""
        draws = [(i.partner, use.grant_id, use.applied) for i in invoices for use in i.credits]
        if not self._partners_db_exists():
            return
        db = Database(self.settings.partners_db_url, max_connections=1)
        try:
            CreditStore(db).record_close(period.id, period.end, [i.partner for i in invoices], draws)
        finally:
            db.close()

    def compute(self, period: Period) -> tuple[list[Invoice], Reconciliation]:
        series = self.series(period)
        boundaries = [period.start, *self.book.changes(period.start, period.end), period.end]
        usage = bucket_usage(series, boundaries)
        with self._gateway_db(self.settings.ledger_db_url) as db:
            reconciliation = reconcile(period, series, LedgerReader(db))
        drift = reconciliation.drift()
        # A partner the ledger knows but the counters never saw still gets an invoice (empty, flagged by its drift).
        seen_by_ledger = [p for p, d in drift.items() if d.ledger_tokens or d.ledger_requests]
        invoices = build_invoices(
            period,
            usage,
            boundaries,
            self._plans(period.end),
            self.book,
            self.settings.default_plan,
            seen_by_ledger,
            self._grants(period),
        )
        reviewed = []
        for invoice in invoices:
            d = drift.get(invoice.partner)
            if d is not None:
                exceeds = d.exceeds(self.settings.drift_threshold_tokens, self.settings.drift_threshold_ratio)
                invoice = replace(invoice, drift=d, needs_review=exceeds)
            reviewed.append(invoice)
        return reviewed, reconciliation

    def _publish_drift(self, reconciliation: Reconciliation) -> None:
        """The drift gauges show the last period closed (drafts and reports of open periods leave them alone)."""
        for partner, d in reconciliation.drift().items():
            self.metrics.drift_tokens.labels(partner).set(d.tokens)
            self.metrics.drift_ratio.labels(partner).set(float(d.ratio))

    # -- operations (HTTP API and CLI) ---------------------------------------------------------------
    def close_period(self, text: str) -> list[StoredInvoice]:
        """Closes a period (idempotent): the stored invoices, written now or by an earlier close."""
        period = Period.parse(text)
        with self._close_lock:
            if not self.store.is_closed(period.id):
                self.check_complete(period)
                invoices, reconciliation = self.compute(period)
                self._record_draws(period, invoices)
                stored = [StoredInvoice(period.id, i.partner, i.status, i.to_json(), i.to_csv()) for i in invoices]
                crash = self._crash if self.settings.crash_point == "close_before_commit" else None
                if self.store.write_close(period.id, period.start, period.end, stored, reconciliation.rows, crash):
                    self.metrics.invoices_closed.inc(len(stored))
                    self._publish_drift(reconciliation)
                    log.info("closed period %s: %d invoices", period.id, len(stored))
            self.metrics.needing_review.set(self.store.needing_review())
            return self.store.invoices(period.id)

    @staticmethod
    def _crash() -> None:
        """The documented test seam ``BILLING_CRASH_POINT=close_before_commit``: die inside the transaction."""
        os.kill(os.getpid(), signal.SIGKILL)

    def invoices(self, period_text: str | None = None, partner: str | None = None) -> list[dict[str, Any]]:
        """Stored invoices; for a period not closed yet, drafts computed now (``status: draft``, not stored)."""
        if period_text is None:
            return [_stored(i) for i in self.store.invoices(None, partner)]
        period = Period.parse(period_text)
        if self.store.is_closed(period.id):
            return [_stored(i) for i in self.store.invoices(period.id, partner)]
        invoices, _ = self.compute(period)
        return [
            {"period": period.id, "partner": i.partner, "status": "draft", "invoice": i.as_dict(), "csv": i.to_csv()}
            for i in invoices
            if partner is None or i.partner == partner
        ]

    def reconciliation(self, period_text: str) -> dict[str, Any]:
        period = Period.parse(period_text)
        if self.store.is_closed(period.id):
            result = Reconciliation(period, self.store.reconciliation(period.id))
        else:
            _, result = self.compute(period)
        report = result.report(self.settings.drift_threshold_tokens, self.settings.drift_threshold_ratio)
        report["closed"] = self.store.is_closed(period.id)
        return report

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.settings.mode,
            "targets": [t.__dict__ for t in self.store.targets()],
            "closed_periods": self.store.closed_periods(),
            "invoices_needing_review": self.store.needing_review(),
        }


def _stored(invoice: StoredInvoice) -> dict[str, Any]:
    return {
        "period": invoice.period,
        "partner": invoice.partner,
        "status": invoice.status,
        "invoice": json.loads(invoice.document),
        "csv": invoice.csv,
    }
