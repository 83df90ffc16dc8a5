"""Billing periods: a calendar month (``2026-11``, the default) or any range on demand
(``2026-11-25T12:00:00Z..2026-11-25T13:30:00Z``). Times are UTC; a period is ``[start, end)``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class PeriodError(ValueError):
    pass


def iso(ts: float) -> str:
    """UTC ISO-8601 with a ``Z``; microseconds only when the time has them."""
    moment = datetime.fromtimestamp(ts, UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def previous_month(now: datetime) -> str:
    """The calendar month before ``now`` (UTC), as ``YYYY-MM``: what the monthly close CronJob closes."""
    year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
    return f"{year:04d}-{month:02d}"


def _micros(ts: float) -> int:
    return round(ts * 1_000_000)


def parse_time(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise PeriodError(f"not an ISO-8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class Period:
    id: str  # canonical text: the key invoices are stored under
    start: float
    end: float
    monthly: bool  # a calendar month (else a range on demand)

    def month_share(self) -> Decimal:
        """1 for a calendar month; else the range's share of the month it starts in (microseconds, 28 digits)."""
        if self.monthly:
            return Decimal(1)
        begins = datetime.fromtimestamp(self.start, UTC)
        month = Period.parse(f"{begins.year:04d}-{begins.month:02d}")
        return Decimal(_micros(self.end) - _micros(self.start)) / Decimal(_micros(month.end) - _micros(month.start))

    @classmethod
    def parse(cls, text: str) -> Period:
        month = _MONTH.match(text.strip())
        if month:
            year, number = int(month.group(1)), int(month.group(2))
            if not 1 <= number <= 12:
                raise PeriodError(f"no month {number} in {text!r}")
            start = datetime(year, number, 1, tzinfo=UTC)
            end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
            return cls(f"{year:04d}-{number:02d}", start.timestamp(), end.timestamp(), True)
        if ".." not in text:
            raise PeriodError(f"a period is YYYY-MM or START..END (ISO-8601 UTC); got {text!r}")
        first, _, last = text.partition("..")
        start_ts, end_ts = parse_time(first), parse_time(last)
        if end_ts <= start_ts:
            raise PeriodError(f"period {text!r} ends before it starts")
        return cls(f"{iso(start_ts)}..{iso(end_ts)}", start_ts, end_ts, False)
