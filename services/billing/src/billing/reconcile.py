"""Reconciliation: usage derived from the counters against the ledger, per partner and hour.

Both sides count a request when it finishes, but the counters see it at the next scrape, so a request
finishing just before an hour (or period) boundary can land one hour later on the counter side: hourly rows
show that as equal and opposite drift in neighbouring hours. The review decision uses the period totals:
an invoice needs review when ``|counter tokens - ledger tokens| > max(threshold_tokens, threshold_ratio *
ledger tokens)`` or the request counts differ by more than ``threshold_ratio * ledger requests``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from billing.counters import Series, bucket_usage, hour_boundaries
from billing.invoices import Drift
from billing.ledger import LedgerReader
from billing.periods import Period, iso

# partner, hour start, counter tokens, ledger tokens, counter requests, ledger requests
Row = tuple[str, float, int, int, int, int]


@dataclass(frozen=True)
class Reconciliation:
    period: Period
    rows: list[Row]

    def drift(self) -> dict[str, Drift]:
        per: dict[str, Drift] = {}
        for partner, _, counter_tokens, ledger_tokens, counter_requests, ledger_requests in self.rows:
            d = per.get(partner, Drift())
            per[partner] = Drift(
                d.counter_tokens + counter_tokens,
                d.ledger_tokens + ledger_tokens,
                d.counter_requests + counter_requests,
                d.ledger_requests + ledger_requests,
            )
        return per

    def report(self, threshold_tokens: int, threshold_ratio: Any) -> dict[str, Any]:
        partners = []
        for partner, drift in sorted(self.drift().items()):
            partners.append(
                {
                    "partner": partner,
                    "counter_tokens": drift.counter_tokens,
                    "ledger_tokens": drift.ledger_tokens,
                    "drift_tokens": drift.tokens,
                    "drift_ratio": str(drift.ratio),
                    "counter_requests": drift.counter_requests,
                    "ledger_requests": drift.ledger_requests,
                    "needs_review": drift.exceeds(threshold_tokens, threshold_ratio),
                    "hours": [
                        {
                            "hour": iso(hour),
                            "counter_tokens": ct,
                            "ledger_tokens": lt,
                            "drift_tokens": ct - lt,
                            "counter_requests": cr,
                            "ledger_requests": lr,
                        }
                        for who, hour, ct, lt, cr, lr in self.rows
                        if who == partner
                    ],
                }
            )
        period = self.period
        return {"period": period.id, "from": iso(period.start), "to": iso(period.end), "partners": partners}


def reconcile(period: Period, series: Iterable[Series], ledger: LedgerReader) -> Reconciliation:
    hours = hour_boundaries(period.start, period.end)
    counted = bucket_usage(series, hours)
    recorded = ledger.by_partner(hours)
    per_hour: dict[tuple[str, int], list[int]] = {}
    for key, quantity in counted.items():
        cell = per_hour.setdefault((key.partner, key.bucket), [0, 0, 0, 0])
        cell[0 if key.unit != "requests" else 2] += quantity
    for (partner, bucket), totals in recorded.items():
        cell = per_hour.setdefault((partner, bucket), [0, 0, 0, 0])
        cell[1] += totals.tokens
        cell[3] += totals.requests
    rows = [
        (partner, hours[bucket], cell[0], cell[1], cell[2], cell[3])
        for (partner, bucket), cell in sorted(per_hour.items())
        if any(cell)
    ]
    return Reconciliation(period, rows)
