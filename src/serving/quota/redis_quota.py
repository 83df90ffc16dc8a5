"""Quota shared by every gateway replica: the same sliding windows as ``memory``, kept in Redis and
changed only by Lua scripts, so a reservation across all limits is atomic.

When Redis cannot be reached the configured policy applies: ``closed`` (default) rejects the call with
UNAVAILABLE/503 and retry-after; ``open`` lets it in unreserved (and counts it in a metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving.domain import Caller
from serving.errors import Unavailable
from serving.quota.limiter import WINDOW_S, RateLimits, Reservation, exceeded, month_of, seconds_to_month_end

log = logging.getLogger("serving.quota")

_LEASE_MS = 600_000
_CLAIM_TTL_S = 7 * 24 * 3600

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
_SETTLE = """
local reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3])
local member = ARGV[1] .. ':' .. reserved
local score = redis.call('ZSCORE', KEYS[1], member)
if score then
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. actual)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], actual - reserved) end
end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('INCRBY', KEYS[4], actual - reserved) end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


def _keys(partner_id: str, month: str) -> list[str]:
    tag = f"quota:{{{partner_id}}}"  # one hash slot per partner (Redis Cluster)
    return [f"{tag}:req", f"{tag}:tok", f"{tag}:toksum", f"{tag}:lease", f"{tag}:month:{month}"]


class RedisQuota:
    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = False,
        on_fail_open: Callable[[], None] = lambda: None,
        timeout_s: float = 0.5,
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._fail_open = fail_open
        self._on_fail_open = on_fail_open

    def _unreachable(self, exc: RedisError) -> None:
        log.warning("quota store unreachable: %s", exc)
        if not self._fail_open:
            raise Unavailable("the quota service is unreachable; retry shortly", retry_after_s=1.0) from exc
        self._on_fail_open()

    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        now = time.time()
        month = month_of(now)
        plan = caller.plan
        window_ms = int(WINDOW_S * 1000)
        args: list[Any] = [
            int(now * 1000), window_ms, reservation_id, plan.requests_per_minute, plan.tokens_per_minute,
            plan.max_concurrent, _LEASE_MS, tokens, plan.monthly_tokens, 40 * 24 * 3600,
        ]  # fmt: skip
        try:
            result = await self._reserve(keys=_keys(caller.partner_id, month), args=args)
        except RedisError as exc:
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
        keys = _keys(reservation.partner_id, reservation.month)
        try:
            await self._settle(
                keys=[keys[1], keys[2], keys[3], keys[4]],
                args=[reservation.reservation_id, reservation.tokens, actual_tokens],
            )
        except RedisError as exc:  # the lease expires on its own; the estimate stays counted (never under-counts)
            log.warning("quota settle failed for %s: %s", reservation.reservation_id, exc)

    async def claim_request_id(self, partner_id: str, request_id: str) -> bool:
        try:
            return bool(await self._redis.set(f"idem:{{{partner_id}}}:{request_id}", 1, nx=True, ex=_CLAIM_TTL_S))
        except RedisError as exc:
            self._unreachable(exc)
            return True

    async def release_request_id(self, partner_id: str, request_id: str) -> None:
        try:
            await self._redis.delete(f"idem:{{{partner_id}}}:{request_id}")
        except RedisError as exc:
            log.warning("could not release request id %s: %s", request_id, exc)

    async def close(self) -> None:
        await self._redis.aclose()
