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

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from serving.commerce.wallet import GrantUse, Reserved, WalletGrant
from serving.errors import Unavailable
from serving.storage.redis_batch import RedisBatch

log = logging.getLogger("serving.wallet")

_SETTLE_RETRY_FIRST_S = 0.25
_SETTLE_RETRY_MAX_S = 5.0

# KEYS: used, held, holds, leases.  ARGV: now_ms, lease_ms, hold_id, cost, n, then n x (grant, amount, floor).
# Returns {ok, balance}: held (balance after) or refused (the free balance).
_RESERVE = """
local used, held, holds, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, lease, id, cost, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local function int(x) return string.format('%.0f', x) end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  local parts = redis.call('HGET', holds, gone)
  if parts then
    for g, a in string.gmatch(parts, '([^:,]+):(%d+)') do redis.call('HINCRBY', held, g, int(-tonumber(a))) end
    redis.call('HDEL', holds, gone)
  end
end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local left, balance, take = cost, 0, {}
for i = 0, n - 1 do
  local g, amount, floor = ARGV[6 + 3 * i], tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
  local u = tonumber(redis.call('HGET', used, g) or '0')
  if u < floor then redis.call('HSET', used, g, int(floor)); u = floor end
  local free = amount - u - tonumber(redis.call('HGET', held, g) or '0')
  if free > 0 then
    balance = balance + free
    if left > 0 then
      local t = math.min(free, left)
      take[#take + 1] = {g, t}
      left = left - t
    end
  end
end
if redis.call('HEXISTS', holds, id) == 1 then return {1, int(balance)} end  -- sent again after a lost reply
if left > 0 then return {0, int(balance)} end
local parts = {}
for _, p in ipairs(take) do
  redis.call('HINCRBY', held, p[1], int(p[2]))
  parts[#parts + 1] = p[1] .. ':' .. int(p[2])
end
redis.call('HSET', holds, id, table.concat(parts, ','))
redis.call('ZADD', leases, now + lease, id)
return {1, int(balance - cost)}
"""

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

# KEYS: used, held.  Returns {used hash, held hash} as flat lists.
_USAGE = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


def _keys(partner_id: str) -> list[str]:
    tag = f"wallet:{{{partner_id}}}"
    return [f"{tag}:used", f"{tag}:held", f"{tag}:holds", f"{tag}:leases"]


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWallet:
    """Money fails closed: when Redis cannot be reached a prepaid request is refused (UNAVAILABLE, retry), whatever
    the quota's failure policy. A settlement that cannot reach Redis is retried in the background until the hold's
    lease would have expired."""

    def __init__(self, batch: RedisBatch, *, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self._batch = batch
        self._lease_ms = int(lease_s * 1000)
        self._clock = clock
        batch.register("wallet_reserve", _RESERVE)
        batch.register("wallet_settle", _SETTLE)
        batch.register("wallet_usage", _USAGE)
        self._retrying: set[asyncio.Task[None]] = set()

    async def reserve(self, partner_id: str, hold_id: str, cost: int, grants: Sequence[WalletGrant]) -> Reserved:
        args: list[Any] = [int(self._clock() * 1000), self._lease_ms, hold_id, cost, len(grants)]
        for grant in grants:
            args += [grant.id, grant.amount, grant.floor]
        try:
            result = await self._batch.call("wallet_reserve", _keys(partner_id), args)
        except (RedisError, TimeoutError) as exc:
            log.warning("prepaid wallet unreachable: %s", exc)
            raise Unavailable("the prepaid balance cannot be checked now; retry shortly", retry_after_s=1.0) from exc
        return Reserved(bool(int(result[0])), int(result[1]))

    async def settle(self, partner_id: str, hold_id: str, cost: int) -> None:
        try:
            await self._batch.call("wallet_settle", _keys(partner_id), [hold_id, cost], lazy=True)
        except (RedisError, TimeoutError) as exc:
            log.warning("wallet settle for %s failed, retrying in the background: %r", hold_id, exc)
            task = asyncio.get_running_loop().create_task(self._retry(partner_id, hold_id, cost))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

    async def _retry(self, partner_id: str, hold_id: str, cost: int) -> None:
        give_up_at, delay = time.monotonic() + self._lease_ms / 1000, _SETTLE_RETRY_FIRST_S
        while time.monotonic() < give_up_at:
            await asyncio.sleep(delay)
            try:
                await self._batch.call("wallet_settle", _keys(partner_id), [hold_id, cost])
                return
            except (RedisError, TimeoutError):
                delay = min(delay * 2, _SETTLE_RETRY_MAX_S)
        log.warning("wallet settle for %s dropped: its lease expired and released the hold", hold_id)

    async def usage(self, partner_id: str) -> dict[str, GrantUse]:
        try:
            used, held = await self._batch.call("wallet_usage", _keys(partner_id)[:2], [])
        except (RedisError, TimeoutError) as exc:
            raise Unavailable("the prepaid balance cannot be read now; retry shortly", retry_after_s=1.0) from exc
        used_by, held_by = _pairs(used), _pairs(held)
        return {g: GrantUse(used_by.get(g, 0), held_by.get(g, 0)) for g in set(used_by) | set(held_by)}

    async def close(self) -> None:
        for task in list(self._retrying):
            task.cancel()
        await asyncio.gather(*self._retrying, return_exceptions=True)
