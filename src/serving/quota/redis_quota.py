"""Quota shared by every gateway replica: the same bucketed sliding windows as ``memory``, kept in Redis and
changed only by Lua functions, so a reservation across all limits is atomic. Reservations and settlements go
through ``RedisBatch``: those made during one event-loop turn share one script call (one round trip), applied in
arrival order.

When Redis cannot be reached (connection error, or no answer within ``timeout_s``) the configured policy
applies: ``closed`` (default) rejects the call with UNAVAILABLE/503 and retry-after; ``open`` lets it in
unreserved (and counts it in a metric). Pooled connections that a Redis restart broke are replaced on their next
use (one immediate retry on a connection error), and the batch loads its script again into a restarted Redis that
lost it (NOSCRIPT).

Both functions are idempotent per reservation id, so a call whose reply was lost can be sent again: a reservation
is recorded once, and a settlement applies only while its concurrency lease exists. A settlement that cannot
reach Redis is retried in the background with backoff until the lease would have expired anyway; a reservation
that timed out (Redis may have applied it after all) is released the same way. Leases expire after ``lease_s``,
the longest a request can hold one, so a lease whose settlement never arrives frees its slot on its own.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serving.domain import Caller
from serving.errors import Unavailable
from serving.quota.limiter import (
    BUCKET_S,
    WINDOW_S,
    RateLimits,
    Reservation,
    bucket_of,
    exceeded,
    month_of,
    seconds_to_month_end,
)
from serving.storage.redis_batch import RedisBatch
from serving.storage.retry_queue import RetryQueue

log = logging.getLogger("serving.quota")

DEFAULT_LEASE_S = 90.0  # what Settings derives by default: http_timeout_s + admission wait + shutdown grace
# An unreachable Redis: redis-py's connection errors and timeouts, or the overall bound on one call.
_UNREACHABLE = (RedisError, TimeoutError)

# KEYS: window hash (per-bucket counts 'r<b>'/'t<b>' and their sums 'r'/'t'), bucket zset, leases zset, month
# counter.  ARGV: now_ms, window_ms, bucket_ms, bucket, id, rpm, tpm, max_concurrent, lease_ms, tokens, monthly,
# month_ttl_s.  Returns {ok, reason, wait_ms (-1: month end), requests used, tokens used, reset_ms}.
_RESERVE = """
local now, window, w, b, id = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local rpm, tpm, maxc = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local lease, tokens, monthly = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local win, bkt = KEYS[1], KEYS[2]
-- A bucket counts until its end plus the window: buckets up to this index have stopped counting.
local cutoff = math.floor((now - window) / w) - 1
local used = tonumber(redis.call('HGET', win, 'r') or '0')
local sum = tonumber(redis.call('HGET', win, 't') or '0')
local expired = redis.call('ZRANGEBYSCORE', bkt, '-inf', cutoff)
if #expired > 0 then
  for _, e in ipairs(expired) do
    used = used - tonumber(redis.call('HGET', win, 'r' .. e) or '0')
    sum = sum - tonumber(redis.call('HGET', win, 't' .. e) or '0')
    redis.call('HDEL', win, 'r' .. e, 't' .. e)
  end
  redis.call('ZREMRANGEBYSCORE', bkt, '-inf', cutoff)
  if used < 0 then used = 0 end
  if sum < 0 then sum = 0 end
  redis.call('HSET', win, 'r', used, 't', sum)
end
local function until_freed(prefix, need)
  local freed = 0
  for _, e in ipairs(redis.call('ZRANGE', bkt, 0, -1)) do
    freed = freed + tonumber(redis.call('HGET', win, prefix .. e) or '0')
    if freed >= need then return math.max((tonumber(e) + 1) * w + window - now, 0) end
  end
  return window
end
local reset = 0
local oldest = redis.call('ZRANGE', bkt, 0, 0)
if #oldest > 0 then reset = math.max((tonumber(oldest[1]) + 1) * w + window - now, 0) end
if redis.call('ZSCORE', KEYS[3], id) then  -- sent again after a lost reply: already recorded
  return {1, '', 0, used, sum, reset}
end
if rpm > 0 and used >= rpm then return {0, 'requests', until_freed('r', used + 1 - rpm), used, sum, reset} end
if tpm > 0 and sum + tokens > tpm then
  if tokens > tpm then return {0, 'tokens_request', window, used, sum, reset} end
  return {0, 'tokens', until_freed('t', sum + tokens - tpm), used, sum, reset}
end
-- Expired leases go whatever the plan: with no concurrency limit, leases whose settlement was lost would
-- otherwise pile up in a key that steady traffic keeps alive.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if maxc > 0 and redis.call('ZCARD', KEYS[3]) >= maxc then return {0, 'concurrency', 100, used, sum, reset} end
if monthly > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') + tokens > monthly then
  return {0, 'monthly_tokens', -1, used, sum, reset}
end
redis.call('HSET', win, 'r', used + 1, 't', sum + tokens)
redis.call('HINCRBY', win, 't' .. b, tokens)
redis.call('ZADD', KEYS[3], now + lease, id)
redis.call('INCRBY', KEYS[4], tokens)  -- counted without a budget too: a budget set mid-month sees the month
if redis.call('HINCRBY', win, 'r' .. b, 1) == 1 then  -- a new bucket: list it, and keep the keys alive past it
  redis.call('ZADD', bkt, tonumber(b), b)
  redis.call('PEXPIRE', win, window + 2 * w)
  redis.call('PEXPIRE', bkt, window + 2 * w)
  redis.call('PEXPIRE', KEYS[3], lease * 2)
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[12]))
end
if #oldest == 0 then reset = (tonumber(b) + 1) * w + window - now end
return {1, '', 0, used + 1, sum + tokens, reset}
"""

# KEYS: window hash, leases zset, month counter.  ARGV: id, reserved, actual, bucket.
# Applies once, while the lease exists: a repeated settlement, or one after the lease expired, changes nothing.
_SETTLE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
if delta == 0 then return 1 end
if redis.call('HEXISTS', KEYS[1], 't' .. ARGV[4]) == 1 then  -- its bucket still counts
  redis.call('HINCRBY', KEYS[1], 't' .. ARGV[4], delta)
  redis.call('HINCRBY', KEYS[1], 't', delta)
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('INCRBY', KEYS[3], delta) end
return 1
"""


def _keys(partner_id: str, month: str) -> list[str]:
    tag = f"quota:{{{partner_id}}}"  # one hash slot per partner (Redis Cluster)
    return [f"{tag}:win", f"{tag}:bkt", f"{tag}:lease", f"{tag}:month:{month}"]


class RedisQuota:
    def __init__(
        self,
        redis: str | RedisBatch,
        *,
        fail_open: bool = False,
        on_fail_open: Callable[[], None] = lambda: None,
        timeout_s: float = 0.5,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout_s <= 0 or lease_s <= 0:
            raise ValueError("the Redis quota needs timeout_s > 0 and lease_s > 0")
        # A URL: this store's own batch; a RedisBatch: shared with the idempotency keys (one round trip per turn).
        self._owns_batch = isinstance(redis, str)
        self._batch = RedisBatch(redis, timeout_s=timeout_s) if isinstance(redis, str) else redis
        self._batch.register("quota_reserve", _RESERVE)
        self._batch.register("quota_settle", _SETTLE)
        self._clock = clock  # window and lease times come from the gateway's clock
        self._lease_ms = int(lease_s * 1000)
        self._fail_open = fail_open
        self._on_fail_open = on_fail_open
        self._retries = RetryQueue("quota settlements")

    @property
    def pending_settles(self) -> int:
        """Settlements waiting for Redis to answer again."""
        return len(self._retries)

    async def settled(self) -> None:
        """Returns once every failed settlement has landed or outlived its lease (the retries have ended)."""
        await self._retries.drained()

    async def _call(self, name: str, keys: list[str], args: list[Any], *, lazy: bool = False) -> Any:
        """One operation in the next batch. Its wait is bounded by the connection's timeout_s per round trip
        (the batch in flight, then its own): a hung Redis fails it with TimeoutError, as it fails the batch."""
        return await self._batch.call(name, keys, args, lazy=lazy)

    def _unreachable(self, exc: Exception) -> None:
        log.warning("quota store unreachable: %s", exc)
        if not self._fail_open:
            raise Unavailable("the quota service is unreachable; retry shortly", retry_after_s=1.0) from exc
        self._on_fail_open()

    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        now = self._clock()
        month = month_of(now)
        plan = caller.plan
        bucket = bucket_of(now)
        args: list[Any] = [
            int(now * 1000), int(WINDOW_S * 1000), int(BUCKET_S * 1000), bucket, reservation_id,
            plan.requests_per_minute, plan.tokens_per_minute, plan.max_concurrent, self._lease_ms, tokens,
            plan.monthly_tokens, 40 * 24 * 3600,
        ]  # fmt: skip
        unreserved = Reservation(caller.partner_id, reservation_id, tokens, month, None, bucket)
        try:
            result = await self._call("quota_reserve", _keys(caller.partner_id, month), args)
        except _UNREACHABLE as exc:
            if not isinstance(exc, RedisConnectionError):  # no answer: Redis may have applied it; release it
                self._retry_later(unreserved, 0)
            self._unreachable(exc)
            return unreserved
        ok, reason = int(result[0]), result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        used, token_sum, reset_ms = (int(v) for v in result[3:6])
        limits = RateLimits(
            limit_requests=plan.requests_per_minute,
            remaining_requests=max(plan.requests_per_minute - used, 0),
            reset_requests_s=reset_ms / 1000,
            limit_tokens=plan.tokens_per_minute,
            remaining_tokens=max(plan.tokens_per_minute - token_sum, 0),
            reset_tokens_s=reset_ms / 1000,
        )
        if not ok:
            wait_ms = float(result[2])
            wait_s = seconds_to_month_end(now) if wait_ms < 0 else wait_ms / 1000
            raise exceeded(reason, caller, wait_s, tokens, limits)
        return Reservation(caller.partner_id, reservation_id, tokens, month, limits, bucket)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        if reservation.limits is None:
            return  # admitted unreserved under the fail-open policy
        try:
            await self._settle_once(reservation, actual_tokens)
        except _UNREACHABLE as exc:  # until it lands the estimate stays counted (never under-counts)
            log.warning("quota settle for %s failed, retrying in the background: %r", reservation.reservation_id, exc)
            self._retry_later(reservation, actual_tokens)

    async def _settle_once(self, reservation: Reservation, actual_tokens: int) -> None:
        win, _bkt, lease, month = _keys(reservation.partner_id, reservation.month)
        args = [reservation.reservation_id, reservation.tokens, actual_tokens, reservation.bucket]
        await self._call("quota_settle", [win, lease, month], args, lazy=True)

    def _retry_later(self, reservation: Reservation, actual_tokens: int) -> None:
        settle = functools.partial(self._settle_once, reservation, actual_tokens)
        self._retries.add(settle, self._lease_ms / 1000, reservation.reservation_id)

    async def close(self) -> None:
        await self._retries.close()
        if self._owns_batch:
            await self._batch.close()
