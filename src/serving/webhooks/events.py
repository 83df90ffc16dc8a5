"""Usage events: the budget periods they belong to and the JSON body every delivery of one event carries.

An event is ``usage.threshold_crossed`` for one partner, metric, period and threshold. The metrics:

- ``monthly_tokens``: tokens used of the plan's budget per UTC calendar month (``used`` and ``limit`` in tokens);
- ``credit_balance``: money used of the partner's active credit grants (``used`` and ``limit`` decimal strings in
  ``currency``). Its period is the set of active grants (``grants-<digest>``): a new grant, or one expiring, starts
  a new period, so the thresholds are armed again for the new balance.

``data.metric`` says which; the body's shape is the same.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from dataclasses import dataclass
from decimal import Decimal

USAGE_THRESHOLD_CROSSED = "usage.threshold_crossed"
MONTHLY_TOKENS = "monthly_tokens"
CREDIT_BALANCE = "credit_balance"
_UTC = datetime.UTC


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Period:
    """A UTC calendar month: the monthly budget's period."""

    name: str  # "2026-12"
    start: datetime.datetime
    end: datetime.datetime  # the next month's start

    @classmethod
    def of(cls, at: float) -> Period:
        moment = datetime.datetime.fromtimestamp(at, _UTC)
        start = datetime.datetime(moment.year, moment.month, 1, tzinfo=_UTC)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return cls(start.strftime("%Y-%m"), start, datetime.datetime(year, month, 1, tzinfo=_UTC))

    def previous(self) -> Period:
        return Period.of(self.start.timestamp() - 1)

    @property
    def first_day(self) -> str:
        return self.start.strftime("%Y-%m-%d")

    @property
    def last_day(self) -> str:
        return (self.end - datetime.timedelta(days=1)).strftime("%Y-%m-%d")

    @property
    def end_ts(self) -> float:
        return self.end.timestamp()


def periods_to_check(now: float, lookback_s: float) -> list[Period]:
    """The current month, and the previous one while the current is younger than ``lookback_s``: usage stored
    late (the last flush before midnight, a journal replayed after a crash) still raises last month's events."""
    current = Period.of(now)
    return [current, current.previous()] if now - current.start.timestamp() < lookback_s else [current]


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def threshold_payload(
    event_id: str,
    partner_id: str,
    plan: str,
    metric: str,
    period: Period,
    threshold: int,
    used: int,
    limit: int,
    created_at: float,
) -> str:
    """The event's body, fixed when the event is created: every attempt and replay sends these exact bytes."""
    data = {
        "metric": metric,
        "period": period.name,
        "period_start": _iso(period.start),
        "period_end": _iso(period.end),
        "threshold_percent": threshold,
        "used": used,
        "limit": limit,
        "used_percent": round(100 * used / limit, 2) if limit else None,
        "plan": plan,
    }
    return _event(event_id, partner_id, created_at, data)


def _event(event_id: str, partner_id: str, created_at: float, data: dict[str, object]) -> str:
    body = {
        "id": event_id,
        "type": USAGE_THRESHOLD_CROSSED,
        "created_at": int(created_at),
        "partner_id": partner_id,
        "data": data,
    }
    return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True)
class CreditSnapshot:
    """A partner's active credit grants: their ids, what they were granted and what is used of them."""

    grant_ids: tuple[str, ...]
    used: Decimal
    granted: Decimal
    currency: str

    @property
    def period(self) -> str:
        digest = hashlib.sha256(",".join(sorted(self.grant_ids)).encode()).hexdigest()[:16]
        return f"grants-{digest}"


def balance_payload(
    event_id: str, partner_id: str, plan: str, snapshot: CreditSnapshot, threshold: int, created_at: float
) -> str:
    """A ``credit_balance`` event's body (fixed when the event is created, like ``threshold_payload``)."""
    used_percent = round(float(100 * snapshot.used / snapshot.granted), 2) if snapshot.granted else None
    data = {
        "metric": CREDIT_BALANCE,
        "period": snapshot.period,
        "grants": sorted(snapshot.grant_ids),
        "threshold_percent": threshold,
        "used": str(snapshot.used),
        "limit": str(snapshot.granted),
        "remaining": str(snapshot.granted - snapshot.used),
        "currency": snapshot.currency,
        "used_percent": used_percent,
        "plan": plan,
    }
    return _event(event_id, partner_id, created_at, data)
