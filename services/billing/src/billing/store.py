"""Billing's own storage: scraped counter samples, scrape state, closed periods, invoices, reconciliation.

SQLite by default, PostgreSQL at scale (same portable SQL). A period is closed in one transaction that
writes every invoice, the reconciliation rows and the period row together: a crash before the commit
leaves nothing, and the next close computes the same documents again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from billing.counters import Sample, Series
from serving.storage.database import Database

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS billing_samples (
        source TEXT NOT NULL, partner TEXT NOT NULL, model TEXT NOT NULL, unit TEXT NOT NULL, labels TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL, value BIGINT NOT NULL, created DOUBLE PRECISION,
        PRIMARY KEY (source, partner, model, unit, labels, ts)
    )""",
    "CREATE INDEX IF NOT EXISTS billing_samples_ts ON billing_samples(ts)",
    """CREATE TABLE IF NOT EXISTS billing_targets (
        source TEXT PRIMARY KEY, url TEXT NOT NULL, last_success DOUBLE PRECISION, last_attempt DOUBLE PRECISION,
        last_error TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS billing_periods (
        period TEXT PRIMARY KEY, start_ts DOUBLE PRECISION NOT NULL, end_ts DOUBLE PRECISION NOT NULL,
        invoices BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS billing_invoices (
        period TEXT NOT NULL, partner TEXT NOT NULL, status TEXT NOT NULL, document TEXT NOT NULL,
        csv TEXT NOT NULL, PRIMARY KEY (period, partner)
    )""",
    """CREATE TABLE IF NOT EXISTS billing_reconciliation (
        period TEXT NOT NULL, partner TEXT NOT NULL, hour_start DOUBLE PRECISION NOT NULL,
        counter_tokens BIGINT NOT NULL, ledger_tokens BIGINT NOT NULL,
        counter_requests BIGINT NOT NULL, ledger_requests BIGINT NOT NULL,
        PRIMARY KEY (period, partner, hour_start)
    )""",
)


@dataclass(frozen=True)
class StoredInvoice:
    period: str
    partner: str
    status: str
    document: str  # the JSON export, byte for byte
    csv: str


@dataclass(frozen=True)
class TargetState:
    source: str
    url: str
    last_success: float | None
    last_attempt: float | None
    last_error: str | None


def _labels(series: Series) -> str:
    return json.dumps(list(series.labels), separators=(",", ":"))


class BillingStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        with db.transaction():
            for statement in _SCHEMA:
                db.execute(statement)

    def close(self) -> None:
        self.db.close()

    # -- samples (embedded scrape mode) --------------------------------------------------------------
    def last_samples(self) -> dict[tuple[str, str, str, str, str], Sample]:
        """The latest stored sample of every series (to store only changes)."""
        rows = self.db.query(
            "SELECT s.source, s.partner, s.model, s.unit, s.labels, s.ts, s.value, s.created FROM billing_samples s"
            " JOIN (SELECT source, partner, model, unit, labels, MAX(ts) AS ts FROM billing_samples"
            " GROUP BY source, partner, model, unit, labels) m ON s.source = m.source AND s.partner = m.partner"
            " AND s.model = m.model AND s.unit = m.unit AND s.labels = m.labels AND s.ts = m.ts"
        )
        return {(r[0], r[1], r[2], r[3], r[4]): Sample(float(r[5]), int(r[6]), r[7]) for r in rows}

    def add_samples(self, source: str, url: str, series: Sequence[Series], ts: float) -> None:
        """Stores one successful scrape: the samples (already filtered to changes) and the target's state."""
        rows = [
            (s.source, s.partner, s.model, s.unit, _labels(s), sample.ts, sample.value, sample.created)
            for s in series
            for sample in s.samples
        ]
        with self.db.transaction():
            self.db.executemany(
                "INSERT INTO billing_samples (source, partner, model, unit, labels, ts, value, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
            self.db.execute(
                "INSERT INTO billing_targets (source, url, last_success, last_attempt, last_error)"
                " VALUES (?, ?, ?, ?, NULL) ON CONFLICT (source) DO UPDATE SET url = excluded.url,"
                " last_success = excluded.last_success, last_attempt = excluded.last_attempt, last_error = NULL",
                (source, url, ts, ts),
            )

    def scrape_failed(self, source: str, url: str, ts: float, error: str) -> None:
        self.db.execute(
            "INSERT INTO billing_targets (source, url, last_success, last_attempt, last_error)"
            " VALUES (?, ?, NULL, ?, ?) ON CONFLICT (source) DO UPDATE SET url = excluded.url,"
            " last_attempt = excluded.last_attempt, last_error = excluded.last_error",
            (source, url, ts, error),
        )

    def targets(self) -> list[TargetState]:
        rows = self.db.query(
            "SELECT source, url, last_success, last_attempt, last_error FROM billing_targets ORDER BY source"
        )
        return [TargetState(*row) for row in rows]

    def series(self, since: float, until: float) -> list[Series]:
        """Every series with its samples in ``[since, until)`` plus its last sample before ``since`` (baseline)."""
        found: dict[tuple[str, str, str, str, str], Series] = {}
        baseline = self.db.query(
            "SELECT s.source, s.partner, s.model, s.unit, s.labels, s.ts, s.value, s.created FROM billing_samples s"
            " JOIN (SELECT source, partner, model, unit, labels, MAX(ts) AS ts FROM billing_samples WHERE ts < ?"
            " GROUP BY source, partner, model, unit, labels) m ON s.source = m.source AND s.partner = m.partner"
            " AND s.model = m.model AND s.unit = m.unit AND s.labels = m.labels AND s.ts = m.ts",
            (since,),
        )
        inside = self.db.query(
            "SELECT source, partner, model, unit, labels, ts, value, created FROM billing_samples"
            " WHERE ts >= ? AND ts < ? ORDER BY ts",
            (since, until),
        )
        for row in [*baseline, *inside]:
            key = (row[0], row[1], row[2], row[3], row[4])
            one = found.get(key)
            if one is None:
                labels = tuple((str(k), str(v)) for k, v in json.loads(row[4]))
                one = found[key] = Series(row[0], row[1], row[2], row[3], labels)
            one.samples.append(Sample(float(row[5]), int(row[6]), row[7]))
        return list(found.values())

    # -- periods and invoices ------------------------------------------------------------------------
    def is_closed(self, period: str) -> bool:
        return self.db.one("SELECT 1 FROM billing_periods WHERE period = ?", (period,)) is not None

    def closed_periods(self) -> list[str]:
        return [row[0] for row in self.db.query("SELECT period FROM billing_periods ORDER BY start_ts, period")]

    def write_close(
        self,
        period: str,
        start: float,
        end: float,
        invoices: Iterable[StoredInvoice],
        reconciliation: Iterable[tuple[str, float, int, int, int, int]],
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        """Writes a whole close in one transaction; False if the period was closed meanwhile (nothing written)."""
        invoice_rows = [(i.period, i.partner, i.status, i.document, i.csv) for i in invoices]
        with self.db.transaction():
            # The period row first: a concurrent close (another process, PostgreSQL) waits on this key and
            # then inserts nothing, so exactly one close writes the invoices.
            claimed = self.db.execute(
                "INSERT INTO billing_periods (period, start_ts, end_ts, invoices) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (period) DO NOTHING",
                (period, start, end, len(invoice_rows)),
            )
            if not claimed:
                return False
            self.db.executemany(
                "INSERT INTO billing_invoices (period, partner, status, document, csv) VALUES (?, ?, ?, ?, ?)",
                invoice_rows,
            )
            self.db.executemany(
                "INSERT INTO billing_reconciliation (period, partner, hour_start, counter_tokens, ledger_tokens,"
                " counter_requests, ledger_requests) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(period, *row) for row in reconciliation],
            )
            if before_commit is not None:
                before_commit()
        return True

    def invoices(self, period: str | None = None, partner: str | None = None) -> list[StoredInvoice]:
        sql = "SELECT period, partner, status, document, csv FROM billing_invoices WHERE 1 = 1"
        params: list[str] = []
        if period is not None:
            sql += " AND period = ?"
            params.append(period)
        if partner is not None:
            sql += " AND partner = ?"
            params.append(partner)
        return [StoredInvoice(*row) for row in self.db.query(sql + " ORDER BY period, partner", params)]

    def needing_review(self) -> int:
        row = self.db.one("SELECT COUNT(*) FROM billing_invoices WHERE status = 'needs_review'")
        return int(row[0]) if row else 0

    def reconciliation(self, period: str) -> list[tuple[str, float, int, int, int, int]]:
        rows = self.db.query(
            "SELECT partner, hour_start, counter_tokens, ledger_tokens, counter_requests, ledger_requests"
            " FROM billing_reconciliation WHERE period = ? ORDER BY partner, hour_start",
            (period,),
        )
        return [(r[0], float(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]
