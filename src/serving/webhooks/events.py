"""Usage events: the budget periods they belong to and the JSON body every delivery of one event carries.

An event is ``usage.threshold_crossed`` for one partner, metric, period and threshold. Today the metric is
``monthly_tokens`` (the plan's budget per UTC calendar month); a prepaid ``balance`` metric can be added with its
own periods without changing the body's shape: ``data.metric`` says which, ``used`` and ``limit`` are in the
metric's unit.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass

USAGE_THRESHOLD_CROSSED = "usage.threshold_crossed"
MONTHLY_TOKENS = "monthly_tokens"
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
    body = {
        "id": event_id,
        "type": USAGE_THRESHOLD_CROSSED,
        "created_at": int(created_at),
        "partner_id": partner_id,
        "data": {
            "metric": metric,
            "period": period.name,
            "period_start": _iso(period.start),
            "period_end": _iso(period.end),
            "threshold_percent": threshold,
            "used": used,
            "limit": limit,
            "used_percent": round(100 * used / limit, 2) if limit else None,
            "plan": plan,
        },
    }
    return json.dumps(body, separators=(",", ":"))
