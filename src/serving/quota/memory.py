"""In-process quota: exact for one gateway replica. Runs on the event loop, so every call is atomic. Memory per
partner is bounded by the window's buckets and the leases in flight, whatever the rate."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.domain import Caller
from serving.quota.limiter import (
    WINDOW_S,
    RateLimits,
    Reservation,
    bucket_expires_s,
    bucket_of,
    exceeded,
    month_of,
    seconds_to_month_end,
)

DEFAULT_LEASE_S = 90.0  # what Settings derives by default: http_timeout_s + admission wait + shutdown grace


@dataclass
class _Bucket:
    index: int
    requests: int = 0
    tokens: int = 0


@dataclass
class _PartnerState:
    buckets: deque[_Bucket] = field(default_factory=deque)  # oldest first; at most one window's worth
    by_index: dict[int, _Bucket] = field(default_factory=dict)
    requests: int = 0  # sums over ``buckets``
    tokens: int = 0
    leases: dict[str, float] = field(default_factory=dict)
    months: dict[str, int] = field(default_factory=dict)

    def evict(self, now: float) -> None:
        while self.buckets and bucket_expires_s(self.buckets[0].index) <= now:
            old = self.buckets.popleft()
            del self.by_index[old.index]
            self.requests -= old.requests
            self.tokens -= old.tokens
        # Leases are added in time order (same lease length), so the expired ones are at the front.
        while self.leases:
            oldest, until = next(iter(self.leases.items()))
            if until > now:
                break
            del self.leases[oldest]

    def add(self, index: int, tokens: int) -> None:
        bucket = self.by_index.get(index)
        if bucket is None:
            bucket = self.by_index[index] = _Bucket(index)
            self.buckets.append(bucket)
        bucket.requests += 1
        bucket.tokens += tokens
        self.requests += 1
        self.tokens += tokens

    def wait_s(self, now: float, need: int, of: Callable[[_Bucket], int]) -> float:
        """How long until buckets holding ``need`` more (requests or tokens) have stopped counting."""
        freed = 0
        for bucket in self.buckets:
            freed += of(bucket)
            if freed >= need:
                return bucket_expires_s(bucket.index) - now
        return WINDOW_S


class MemoryQuota:
    def __init__(self, clock: Callable[[], float] = time.time, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self._clock = clock
        self._lease_s = lease_s  # a lease never released (its settle was lost) frees its slot after this
        self._state: dict[str, _PartnerState] = {}

    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        now = self._clock()
        plan = caller.plan
        state = self._state.setdefault(caller.partner_id, _PartnerState())
        state.evict(now)
        month = month_of(now)
        used_month = state.months.get(month, 0)
        limits = _limits(caller, state, now)
        if plan.requests_per_minute and state.requests >= plan.requests_per_minute:
            wait = state.wait_s(now, state.requests + 1 - plan.requests_per_minute, lambda b: b.requests)
            raise exceeded("requests", caller, wait, tokens, limits)
        if plan.tokens_per_minute and state.tokens + tokens > plan.tokens_per_minute:
            if tokens > plan.tokens_per_minute:
                raise exceeded("tokens_request", caller, WINDOW_S, tokens, limits)
            wait = state.wait_s(now, state.tokens + tokens - plan.tokens_per_minute, lambda b: b.tokens)
            raise exceeded("tokens", caller, wait, tokens, limits)
        if plan.max_concurrent and len(state.leases) >= plan.max_concurrent:
            raise exceeded("concurrency", caller, 0.1, tokens, limits)
        if plan.monthly_tokens and used_month + tokens > plan.monthly_tokens:
            raise exceeded("monthly_tokens", caller, seconds_to_month_end(now), tokens, limits)
        index = bucket_of(now)
        state.add(index, tokens)
        state.leases[reservation_id] = now + self._lease_s
        state.months[month] = used_month + tokens
        return Reservation(caller.partner_id, reservation_id, tokens, month, _limits(caller, state, now), index)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settle_now(reservation, actual_tokens)

    def settle_now(self, reservation: Reservation, actual_tokens: int) -> None:
        """Synchronous: in-process settling needs no round trip, so the caller need not schedule a task."""
        state = self._state.get(reservation.partner_id)
        if state is None or state.leases.pop(reservation.reservation_id, None) is None:
            return  # settled already, or its lease expired (which freed the slot)
        delta = actual_tokens - reservation.tokens
        bucket = state.by_index.get(reservation.bucket)
        if bucket is not None:  # still in the window
            bucket.tokens += delta
            state.tokens += delta
        state.months[reservation.month] = state.months.get(reservation.month, 0) + delta

    async def close(self) -> None:
        pass


def _limits(caller: Caller, state: _PartnerState, now: float) -> RateLimits:
    plan = caller.plan
    reset = bucket_expires_s(state.buckets[0].index) - now if state.buckets else 0.0
    return RateLimits(
        limit_requests=plan.requests_per_minute,
        remaining_requests=max(plan.requests_per_minute - state.requests, 0),
        reset_requests_s=reset,
        limit_tokens=plan.tokens_per_minute,
        remaining_tokens=max(plan.tokens_per_minute - state.tokens, 0),
        reset_tokens_s=reset,
    )
