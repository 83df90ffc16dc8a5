"""The prepaid wallet in Redis, shared by gateway replicas: the semantics of ``serving.commerce.wallet`` in Lua
functions run through the gateway's ``RedisBatch`` (one round trip per event-loop turn, with the quota's calls).

Keys per partner (one hash slot): ``wallet:{p}:used`` and ``wallet:{p}:held`` (grant id → units),
``wallet:{p}:holds`` (hold id → ``grant:units,...``) and ``wallet:{p}:leases`` (hold id → expiry, ms). They never
expire: ``used`` is money spent. Run Redis with persistence (AOF) in production; a Redis that lost them restarts
every grant from its floor, what closed invoices drew.

Amounts are integer units (10⁻⁹); Lua numbers are doubles, exact to 2^53 units, which caps one grant (see
``serving.commerce.money``). Every count written back is formatted with ``%.0f`` so Redis never sees an exponent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from serving.commerce.wallet import GrantUse, Reserved, WalletGrant
from serving.errors import Unavailable
from serving.storage.redis_batch import RedisBatch
from serving.storage.retry_queue import RetryQueue

log = logging.getLogger("serving.wallet")

_CLOSE_WAIT_S = 10.0

# Frees the holds whose lease expired (their gateway never settled). Times are Redis' own (TIME), never a replica's
# clock, so a replica whose clock runs ahead cannot expire another's hold early. Sets ``now`` (ms).
_EXPIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  local parts = redis.call('HGET', KEYS[3], gone)
  if parts then
    for g, a in string.gmatch(parts, '([^:,]+):(%d+)') do
      redis.call('HINCRBY', KEYS[2], g, string.format('%.0f', -tonumber(a)))
    end
    redis.call('HDEL', KEYS[3], gone)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
"""

# KEYS: used, held, holds, leases.  ARGV: lease_ms, hold_id, cost, closed_through, n, then n x (grant, amount, floor).
# Returns {ok, balance, held, seeded}: held (balance after) or refused (the free balance); what requests in flight
# hold on these grants; 1 when the floors were applied here. The '_' field of ``used`` is the closed_through the
# floors were last applied for (missing: the wallet has no state for the partner).
_RESERVE = (
    _EXPIRE
    + """
local used, held, holds, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lease, id, cost, closed, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function int(x) return string.format('%.0f', x) end
local seeded = 0
local mark = redis.call('HGET', used, '_')
if (not mark) or tonumber(mark) < closed then
  for i = 0, n - 1 do
    local g, floor = ARGV[6 + 3 * i], tonumber(ARGV[8 + 3 * i])
    if floor > tonumber(redis.call('HGET', used, g) or '0') then redis.call('HSET', used, g, int(floor)) end
  end
  redis.call('HSET', used, '_', int(closed))
  seeded = 1
end
local left, balance, inflight, take = cost, 0, 0, {}
for i = 0, n - 1 do
  local g, amount = ARGV[6 + 3 * i], tonumber(ARGV[7 + 3 * i])
  local h = tonumber(redis.call('HGET', held, g) or '0')
  inflight = inflight + h
  local free = amount - tonumber(redis.call('HGET', used, g) or '0') - h
  if free > 0 then
    balance = balance + free
    if left > 0 then
      local t = math.min(free, left)
      take[#take + 1] = {g, t}
      left = left - t
    end
  end
end
if redis.call('HEXISTS', holds, id) == 1 then return {1, int(balance), int(inflight), seeded} end  -- a resend
if left > 0 then return {0, int(balance), int(inflight), seeded} end
local parts = {}
for _, p in ipairs(take) do
  redis.call('HINCRBY', held, p[1], int(p[2]))
  parts[#parts + 1] = p[1] .. ':' .. int(p[2])
end
redis.call('HSET', holds, id, table.concat(parts, ','))
redis.call('ZADD', leases, now + lease, id)
return {1, int(balance - cost), int(inflight + cost), seeded}
"""
)

# KEYS: used, held, holds, leases.  ARGV: hold_id, cost.  Applies once, while the hold exists.
_SETTLE = """
local parts = redis.call('HGET', KEYS[3], ARGV[1])
if not parts then return 0 end
local left = tonumber(ARGV[2])
for g, a in string.gmatch(parts, '([^:,]+):(%d+)') do
  local h = tonumber(a)
  redis.call('HINCRBY', KEYS[2], g, string.format('%.0f', -h))
  local t = math.min(h, left)
  if t > 0 then
    redis.call('HINCRBY', KEYS[1], g, string.format('%.0f', t))
    left = left - t
  end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: used, held, holds, leases.  Returns {used hash, held hash} as flat lists (expired holds freed first).
_USAGE = (
    _EXPIRE
    + """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: used.  ARGV: n x (grant, floor).  Raises each grant's use to its floor.
_RAISE = """
for i = 1, #ARGV, 2 do
  local floor = tonumber(ARGV[i + 1])
  if tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') < floor then
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.0f', floor))
  end
end
redis.call('HSETNX', KEYS[1], '_', 0)
return 1
"""


def _keys(partner_id: str) -> list[str]:
    tag = f"wallet:{{{partner_id}}}"
    return [f"{tag}:used", f"{tag}:held", f"{tag}:holds", f"{tag}:leases"]


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    """A flat HGETALL reply as a dict, without the '_' marker."""
    pairs = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    pairs.pop("_", None)
    return pairs


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWallet:
    """Money fails closed: when Redis cannot be reached a prepaid request is refused (UNAVAILABLE, retry), whatever
    the quota's failure policy. A settlement that cannot reach Redis, and the release of a hold whose reserve got no
    answer (Redis may have applied it), wait in one bounded queue that a single task retries with backoff until the
    hold's lease would have expired; closing gives that task a few seconds before giving up."""

    def __init__(self, batch: RedisBatch, *, lease_s: float) -> None:
        self._batch = batch
        self._lease_ms = int(lease_s * 1000)
        batch.register("wallet_reserve", _RESERVE)
        batch.register("wallet_settle", _SETTLE)
        batch.register("wallet_usage", _USAGE)
        batch.register("wallet_raise", _RAISE)
        self._retries = RetryQueue("prepaid settlements")

    @property
    def pending_settles(self) -> int:
        return len(self._retries)

    async def reserve(
        self, partner_id: str, hold_id: str, cost: int, grants: Sequence[WalletGrant], closed_through: int = 0
    ) -> Reserved:
        args: list[Any] = [self._lease_ms, hold_id, cost, closed_through, len(grants)]
        for grant in grants:
            args += [grant.id, grant.amount, grant.floor]
        try:
            result = await self._batch.call("wallet_reserve", _keys(partner_id), args)
        except (RedisError, TimeoutError) as exc:
            log.warning("prepaid wallet unreachable: %s", exc)
            if not isinstance(exc, RedisConnectionError):  # no answer: it may have been held; release it
                self._retry_later(partner_id, hold_id, 0)
            raise Unavailable("the prepaid balance cannot be checked now; retry shortly", retry_after_s=1.0) from exc
        ok, balance, held, seeded = (int(v) for v in result)
        return Reserved(bool(ok), balance, held, bool(seeded))

    async def raise_floors(self, partner_id: str, floors: Sequence[WalletGrant]) -> None:
        args = [v for grant in floors for v in (grant.id, grant.floor)]
        await self._batch.call("wallet_raise", _keys(partner_id)[:1], args)

    async def settle(self, partner_id: str, hold_id: str, cost: int) -> None:
        try:
            await self._batch.call("wallet_settle", _keys(partner_id), [hold_id, cost], lazy=True)
        except (RedisError, TimeoutError) as exc:
            log.warning("wallet settle for %s failed, retrying in the background: %r", hold_id, exc)
            self._retry_later(partner_id, hold_id, cost)

    def _retry_later(self, partner_id: str, hold_id: str, cost: int) -> None:
        settle = functools.partial(self._batch.call, "wallet_settle", _keys(partner_id), [hold_id, cost])
        self._retries.add(settle, self._lease_ms / 1000, hold_id)

    async def usage(self, partner_id: str) -> dict[str, GrantUse] | None:
        try:
            used, held = await self._batch.call("wallet_usage", _keys(partner_id), [])
        except (RedisError, TimeoutError) as exc:
            raise Unavailable("the prepaid balance cannot be read now; retry shortly", retry_after_s=1.0) from exc
        if not used:
            return None  # no state for this partner
        used_by, held_by = _pairs(used), _pairs(held)
        return {g: GrantUse(used_by.get(g, 0), held_by.get(g, 0)) for g in set(used_by) | set(held_by)}

    async def close(self, wait_s: float = _CLOSE_WAIT_S) -> None:
        """Gives the settlements still waiting ``wait_s`` to land (each not landed keeps its hold until the lease)."""
        await self._retries.close(wait_s)
