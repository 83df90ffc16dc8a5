"""In-process quota: exact for one gateway replica. Runs on the event loop, so every call is atomic."""

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
    exceeded,
    month_of,
    seconds_to_month_end,
)

DEFAULT_LEASE_S = 90.0  # what Settings derives by default: http_timeout_s + admission wait + shutdown grace


@dataclass
class _Entry:
    at: float
    tokens: int


@dataclass
class _PartnerState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[_Entry] = field(default_factory=deque)
    token_sum: int = 0
    by_id: dict[str, _Entry] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    months: dict[str, int] = field(default_factory=dict)

    def evict(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0].at <= cutoff:
            self.token_sum -= self.tokens.popleft().tokens
        self.by_id = {k: e for k, e in self.by_id.items() if e.at > cutoff} if len(self.by_id) > 4096 else self.by_id
        self.leases = {k: until for k, until in self.leases.items() if until > now}


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
        if plan.requests_per_minute and len(state.requests) >= plan.requests_per_minute:
            raise exceeded("requests", caller, state.requests[0] + WINDOW_S - now, tokens, limits)
        if plan.tokens_per_minute and state.token_sum + tokens > plan.tokens_per_minute:
            if tokens > plan.tokens_per_minute:
                raise exceeded("tokens_request", caller, WINDOW_S, tokens, limits)
            need, freed, wait = state.token_sum + tokens - plan.tokens_per_minute, 0, WINDOW_S
            for entry in state.tokens:
                freed += entry.tokens
                if freed >= need:
                    wait = entry.at + WINDOW_S - now
                    break
            raise exceeded("tokens", caller, wait, tokens, limits)
        if plan.max_concurrent and len(state.leases) >= plan.max_concurrent:
            raise exceeded("concurrency", caller, 0.1, tokens, limits)
        if plan.monthly_tokens and used_month + tokens > plan.monthly_tokens:
            raise exceeded("monthly_tokens", caller, seconds_to_month_end(now), tokens, limits)
        state.requests.append(now)
        entry = _Entry(now, tokens)
        state.tokens.append(entry)
        state.by_id[reservation_id] = entry
        state.token_sum += tokens
        state.leases[reservation_id] = now + self._lease_s
        state.months[month] = used_month + tokens
        return Reservation(caller.partner_id, reservation_id, tokens, month, _limits(caller, state, now))

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self.settle_now(reservation, actual_tokens)

    def settle_now(self, reservation: Reservation, actual_tokens: int) -> None:
        """Synchronous: in-process settling needs no round trip, so the caller need not schedule a task."""
        state = self._state.get(reservation.partner_id)
        if state is None:
            return
        delta = actual_tokens - reservation.tokens
        entry = state.by_id.pop(reservation.reservation_id, None)
        if entry is not None and entry.at > self._clock() - WINDOW_S:
            entry.tokens += delta
            state.token_sum += delta
        state.months[reservation.month] = state.months.get(reservation.month, 0) + delta
        state.leases.pop(reservation.reservation_id, None)

    async def close(self) -> None:
        pass


def _limits(caller: Caller, state: _PartnerState, now: float) -> RateLimits:
    plan = caller.plan
    reset_requests = state.requests[0] + WINDOW_S - now if state.requests else 0.0
    reset_tokens = state.tokens[0].at + WINDOW_S - now if state.tokens else 0.0
    return RateLimits(
        limit_requests=plan.requests_per_minute,
        remaining_requests=max(plan.requests_per_minute - len(state.requests), 0),
        reset_requests_s=reset_requests,
        limit_tokens=plan.tokens_per_minute,
        remaining_tokens=max(plan.tokens_per_minute - state.token_sum, 0),
        reset_tokens_s=reset_tokens,
    )
