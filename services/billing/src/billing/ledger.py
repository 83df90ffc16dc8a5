"""Read-only views of the gateway's databases: the usage ledger (for reconciliation) and partners' plans.

Billing never writes there. The ledger's ``usage_records`` hold one row per admitted request; a request is
counted in the hour its ``finished_at`` falls in, which is when the gateway increments its counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from serving.storage.database import Database


@dataclass(frozen=True)
class LedgerTotals:
    tokens: int
    requests: int


def _days(start: float, end: float) -> list[str]:
    """Every ``day`` (the record's start day) a record finishing in ``[start, end)`` can carry."""
    first = datetime.fromtimestamp(start, UTC).date() - timedelta(days=1)  # started the day before, finished after
    last = datetime.fromtimestamp(end, UTC).date()
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


class LedgerReader:
    def __init__(self, db: Database) -> None:
        self.db = db

    def by_partner(self, buckets: Sequence[float]) -> dict[tuple[str, int], LedgerTotals]:
        """Tokens (input + output) and requests per partner and bucket ``[buckets[i], buckets[i + 1])``."""
        totals: dict[tuple[str, int], LedgerTotals] = {}
        for index in range(len(buckets) - 1):
            start, end = buckets[index], buckets[index + 1]
            days = _days(start, end)
            rows = self.db.query(
                "SELECT partner_id, COALESCE(SUM(input_tokens + output_tokens), 0), COUNT(*) FROM usage_records"
                f" WHERE day IN ({', '.join('?' for _ in days)}) AND finished_at >= ? AND finished_at < ?"
                " GROUP BY partner_id",
                (*days, start, end),
            )
            for partner, tokens, requests in rows:
                totals[(str(partner), index)] = LedgerTotals(int(tokens), int(requests))
        return totals

    def close(self) -> None:
        self.db.close()


class PartnerPlans:
    """Partner id -> plan name, from the gateway's partner store (empty when there is none)."""

    def __init__(self, db: Database | None) -> None:
        self.db = db

    def plans(self, created_before: float) -> dict[str, str]:
        if self.db is None:
            return {}
        rows = self.db.query("SELECT id, plan FROM partners WHERE created_at < ? ORDER BY id", (created_before,))
        return {str(partner): str(plan) for partner, plan in rows}

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
