"""Quota shared by every gateway replica: the same sliding windows as ``memory``, kept in Redis and
changed only by Lua scripts, so a reservation across all limits is atomic.

When Redis cannot be reached (connection error, or no answer within ``timeout_s``) the configured policy
applies: ``closed`` (default) rejects the call with UNAVAILABLE/503 and retry-after; ``open`` lets it in
unreserved (and counts it in a metric). Pooled connections that a Redis restart broke are replaced on their next
use (one immediate retry on a connection error), and ``register_script`` loads the scripts again into a restarted
Redis that lost them (NOSCRIPT).

Both scripts are idempotent per reservation id, so a call whose reply was lost can be sent again: a reservation
is recorded once, and a settlement applies only while its concurrency lease exists. A settlement that cannot
reach Redis is retried in the background with backoff until the lease would have expired anyway; a reservation
that timed out (Redis may have applied it after all) is released the same way. Leases expire after ``lease_s``,
the longest a request can hold one, so a lease whose settlement never arrives frees its slot on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serving.domain import Caller
from serving.errors import Unavailable
from serving.quota.limiter import WINDOW_S, RateLimits, Reservation, exceeded, month_of, seconds_to_month_end

log = logging.getLogger("serving.quota")

T = TypeVar("T")

DEFAULT_LEASE_S = 90.0  # what Settings derives by default: http_timeout_s + admission wait + shutdown grace
_SETTLE_RETRY_FIRST_S = 0.25  # background settle retries: first delay, doubling up to the cap
_SETTLE_RETRY_MAX_S = 5.0
_MAX_PENDING_SETTLES = 10_000  # beyond this a failed settlement is dropped and its lease expires
# An unreachable Redis: redis-py's connection errors and timeouts, or the overall bound on one call.
_UNREACHABLE = (RedisError, TimeoutError)

# KEYS: requests zset, tokens zset ("id:tokens" members), token sum, leases zset, month counter
# ARGV: now_ms, window_ms, id, rpm, tpm, max_concurrent, lease_ms, tokens, monthly, month_ttl_s
_RESERVE = """
local now, window, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local rpm, tpm, maxc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, tokens, monthly = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local cutoff = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local sum = tonumber(redis.call('GET', KEYS[3]) or '0')
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
for _, m in ipairs(expired) do sum = sum - tonumber(string.match(m, ':(%-?%d+)$')) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff) end
if sum < 0 then sum = 0 end
redis.call('SET', KEYS[3], sum, 'PX', window * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local used = redis.call('ZCARD', KEYS[1])
local month_used = tonumber(redis.call('GET', KEYS[5]) or '0')
local function reset(key)
  local o = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #o == 0 then return 0 end
  return math.max(0, tonumber(o[2]) + window - now)
end
if redis.call('ZSCORE', KEYS[1], id) then  -- sent again after a lost reply: already recorded
  return {1, '', 0, used, sum, reset(KEYS[1]), reset(KEYS[2])}
end
if rpm > 0 and used >= rpm then return {0, 'requests', reset(KEYS[1]), used, sum, reset(KEYS[1]), reset(KEYS[2])} end
if tpm > 0 and sum + tokens > tpm then
  if tokens > tpm then return {0, 'tokens_request', window, used, sum, reset(KEYS[1]), reset(KEYS[2])} end
  local need, freed, wait = sum + tokens - tpm, 0, window
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    freed = freed + tonumber(string.match(entries[i], ':(%-?%d+)$'))
    if freed >= need then wait = tonumber(entries[i + 1]) + window - now; break end
  end
  return {0, 'tokens', math.max(wait, 0), used, sum, reset(KEYS[1]), reset(KEYS[2])}
end
if maxc > 0 and redis.call('ZCARD', KEYS[4]) >= maxc then
  return {0, 'concurrency', 100, used, sum, reset(KEYS[1]), reset(KEYS[2])}
end
if monthly > 0 and month_used + tokens > monthly then
  return {0, 'monthly_tokens', -1, used, sum, reset(KEYS[1]), reset(KEYS[2])}
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZADD', KEYS[2], now, id .. ':' .. tokens)
sum = sum + tokens
redis.call('SET', KEYS[3], sum, 'PX', window * 2)
redis.call('ZADD', KEYS[4], now + lease, id)
redis.call('INCRBY', KEYS[5], tokens)
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]))
redis.call('PEXPIRE', KEYS[1], window * 2)
redis.call('PEXPIRE', KEYS[2], window * 2)
redis.call('PEXPIRE', KEYS[4], lease * 2)
return {1, '', 0, used + 1, sum, reset(KEYS[1]), reset(KEYS[2])}
"""

# KEYS: tokens zset, token sum, leases zset, month counter.  ARGV: id, reserved, actual
# Applies once, while the lease exists: a repeated settlement, or one after the lease expired, changes nothing.
_SETTLE = """
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
local reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3])
local member = ARGV[1] .. ':' .. reserved
local score = redis.call('ZSCORE', KEYS[1], member)
if score then
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. actual)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], actual - reserved) end
end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('INCRBY', KEYS[4], actual - reserved) end
return 1
"""


def _keys(partner_id: str, month: str) -> list[str]:
    tag = f"quota:{{{partner_id}}}"  # one hash slot per partner (Redis Cluster)
    return [f"{tag}:req", f"{tag}:tok", f"{tag}:toksum", f"{tag}:lease", f"{tag}:month:{month}"]


@dataclass(frozen=True)
class _PendingSettle:
    reservation: Reservation
    actual_tokens: int
    give_up_at: float  # monotonic; past it the lease has expired and settling changes nothing


class RedisQuota:
    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = False,
        on_fail_open: Callable[[], None] = lambda: None,
        timeout_s: float = 0.5,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout_s <= 0 or lease_s <= 0:
            raise ValueError("the Redis quota needs timeout_s > 0 and lease_s > 0")
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # A connection that a Redis restart broke fails on its next use: retry once, at once, on a new one.
            # Not on timeouts: the call is bounded by timeout_s as a whole.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._timeout_s = timeout_s
        self._clock = clock  # window and lease times come from the gateway's clock
        self._lease_ms = int(lease_s * 1000)
        self._fail_open = fail_open
        self._on_fail_open = on_fail_open
        self._pending: deque[_PendingSettle] = deque()
        self._retrier: asyncio.Task[None] | None = None

    @property
    def pending_settles(self) -> int:
        """Settlements waiting for Redis to answer again."""
        return len(self._pending)

    async def settled(self) -> None:
        """Returns once every failed settlement has landed or outlived its lease (the retries have ended)."""
        while self._retrier is not None and not self._retrier.done():
            await asyncio.shield(self._retrier)

    async def _bounded(self, call: Awaitable[T]) -> T:
        """One round trip (with its reconnect or NOSCRIPT reload) within timeout_s, or TimeoutError."""
        async with asyncio.timeout(self._timeout_s):
            return await call

    def _unreachable(self, exc: Exception) -> None:
        log.warning("quota store unreachable: %s", exc)
        if not self._fail_open:
            raise Unavailable("the quota service is unreachable; retry shortly", retry_after_s=1.0) from exc
        self._on_fail_open()

    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        now = self._clock()
        month = month_of(now)
        plan = caller.plan
        window_ms = int(WINDOW_S * 1000)
        args: list[Any] = [
            int(now * 1000), window_ms, reservation_id, plan.requests_per_minute, plan.tokens_per_minute,
            plan.max_concurrent, self._lease_ms, tokens, plan.monthly_tokens, 40 * 24 * 3600,
        ]  # fmt: skip
        try:
            result = await self._bounded(self._reserve(keys=_keys(caller.partner_id, month), args=args))
        except _UNREACHABLE as exc:
            if not isinstance(exc, RedisConnectionError):  # no answer: Redis may have applied it; release it
                self._retry_later(Reservation(caller.partner_id, reservation_id, tokens, month, None), 0)
            self._unreachable(exc)
            return Reservation(caller.partner_id, reservation_id, tokens, month, None)
        ok, reason = int(result[0]), result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        used, token_sum, reset_requests, reset_tokens = (int(v) for v in result[3:7])
        limits = RateLimits(
            limit_requests=plan.requests_per_minute,
            remaining_requests=max(plan.requests_per_minute - used, 0),
            reset_requests_s=reset_requests / 1000,
            limit_tokens=plan.tokens_per_minute,
            remaining_tokens=max(plan.tokens_per_minute - token_sum, 0),
            reset_tokens_s=reset_tokens / 1000,
        )
        if not ok:
            wait_ms = float(result[2])
            wait_s = seconds_to_month_end(now) if wait_ms < 0 else wait_ms / 1000
            raise exceeded(reason, caller, wait_s, tokens, limits)
        return Reservation(caller.partner_id, reservation_id, tokens, month, limits)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if reservation.limits is None:
            return  # admitted unreserved under the fail-open policy
        try:
            await self._settle_once(reservation, actual_tokens)
        except _UNREACHABLE as exc:  # until it lands the estimate stays counted (never under-counts)
            log.warning("quota settle for %s failed, retrying in the background: %r", reservation.reservation_id, exc)
            self._retry_later(reservation, actual_tokens)

    async def _settle_once(self, reservation: Reservation, actual_tokens: int) -> None:
        keys = _keys(reservation.partner_id, reservation.month)
        await self._bounded(
            self._settle(
                keys=[keys[1], keys[2], keys[3], keys[4]],
                args=[reservation.reservation_id, reservation.tokens, actual_tokens],
            )
        )

    def _retry_later(self, reservation: Reservation, actual_tokens: int) -> None:
        if len(self._pending) >= _MAX_PENDING_SETTLES:
            log.warning("quota settle for %s dropped; its lease expires", reservation.reservation_id)
            return
        give_up_at = time.monotonic() + self._lease_ms / 1000
        self._pending.append(_PendingSettle(reservation, actual_tokens, give_up_at))
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_settles())

    async def _retry_settles(self) -> None:
        """One task per quota store: settles what failed, oldest first, backing off while Redis stays away."""
        delay = _SETTLE_RETRY_FIRST_S
        while self._pending:
            await asyncio.sleep(delay)
            while self._pending:
                pending = self._pending[0]
                if time.monotonic() < pending.give_up_at:
                    try:
                        await self._settle_once(pending.reservation, pending.actual_tokens)
                    except _UNREACHABLE:
                        delay = min(delay * 2, _SETTLE_RETRY_MAX_S)
                        break
                    delay = _SETTLE_RETRY_FIRST_S
                self._pending.popleft()  # settled, or its lease has expired and freed the slot already

    async def close(self) -> None:
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
        if self._pending:
            log.warning("%d quota settlements not delivered; their leases expire", len(self._pending))
        await self._redis.aclose()
