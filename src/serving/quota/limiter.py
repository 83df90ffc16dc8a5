"""The quota contract shared by the in-process and the Redis backends.

Limits are sliding windows of one minute (exact: a partner never gets more than its limit in any
60-second span), a concurrency lease set and a calendar-month token counter. Admission reserves the
estimated tokens; settling replaces the estimate with the actual count, refunding the difference.

A window is kept as per-bucket counts (``BUCKET_S`` wide), not as one entry per request, so its memory is bounded
per partner (``WINDOW_S / BUCKET_S`` buckets) whatever the rate. What a bucket holds counts until the bucket's *end*
plus the window: nothing is forgotten early, so no 60-second span ever holds more than the limit; the price is that
a request may wait up to one bucket (0.1 s) longer than a per-request log would make it (decision 0011).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from serving.domain import Caller
from serving.errors import QuotaExceeded

if TYPE_CHECKING:
    from serving.commerce.prepaid import Hold

WINDOW_S = 60.0
BUCKET_S = 0.1  # window resolution: 600 buckets per window


def bucket_of(epoch_s: float) -> int:
    """The bucket a request admitted at ``epoch_s`` counts in (both backends use integer milliseconds)."""
    return int(epoch_s * 1000) // int(BUCKET_S * 1000)


def bucket_expires_s(bucket: int) -> float:
    """When what bucket ``bucket`` holds stops counting: its end plus the window."""
    return (bucket + 1) * BUCKET_S + WINDOW_S


@dataclass(frozen=True)
class RateLimits:
    """What the response headers / metadata report (0 limit = unlimited)."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float


@dataclass(frozen=True)
class Reservation:
    partner_id: str
    reservation_id: str
    tokens: int
    month: str
    limits: RateLimits | None  # None when the quota store was unreachable and the policy let the call in
    bucket: int = 0  # the window bucket its tokens count in (settling corrects that bucket)
    hold: Hold | None = None  # a prepaid plan's held maximum cost (admission adds it after the quota's reservation)


class QuotaBackend(Protocol):
    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        """Reserves one request and ``tokens``; raises QuotaExceeded (or Unavailable when fail-closed)."""
        ...

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replaces the reserved tokens with the actual count and frees the concurrency slot."""
        ...

    async def close(self) -> None: ...


def month_of(epoch_s: float) -> str:
    utc = time.gmtime(epoch_s)
    return f"{utc.tm_year:04d}-{utc.tm_mon:02d}"  # what strftime("%Y-%m") gives, at a third of its cost


def seconds_to_month_end(epoch_s: float) -> float:
    year, month = time.gmtime(epoch_s)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone - epoch_s


def exceeded(
    reason: str, caller: Caller, retry_after_s: float, tokens: int, limits: RateLimits | None = None
) -> QuotaExceeded:
    plan = caller.plan
    messages = {
        "requests": f"requests per minute limit of plan {plan.name!r} ({plan.requests_per_minute}) reached",
        "tokens": f"tokens per minute limit of plan {plan.name!r} ({plan.tokens_per_minute}) reached",
        "tokens_request": (
            f"this request may use {tokens} tokens, more than plan {plan.name!r} allows per minute"
            f" ({plan.tokens_per_minute}); lower max_tokens or send less text"
        ),
        "concurrency": f"at most {plan.max_concurrent} concurrent requests on plan {plan.name!r}",
        "monthly_tokens": f"monthly token budget of plan {plan.name!r} ({plan.monthly_tokens}) is used up",
    }
    error = QuotaExceeded(
        messages[reason] + "; retry after the indicated delay",
        param=reason,
        retry_after_s=max(retry_after_s, 0.001),
    )
    error.rate_limits = limits
    return error
