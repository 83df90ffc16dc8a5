"""Idempotency keys shared by every gateway replica: one Redis hash per partner and key, changed by Lua scripts
so that claiming, finishing and releasing are atomic. The hash lives ``running_ttl_s`` while its request runs
(a replica that dies mid-request frees the key then; the ledger still refuses to bill the id twice) and
``ttl_s`` once the outcome is stored.

When Redis cannot be reached a request with a key is refused (UNAVAILABLE, retry-after) whatever the quota's
failure policy: running it without its claim could run it twice. Requests without a key never touch this store.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving.errors import Unavailable
from serving.idempotency.store import TOO_LARGE, Claim

log = logging.getLogger("serving.idempotency")

# KEYS: the hash.  ARGV: fingerprint, running ttl ms.  Returns {state, outcome or ''}.
_BEGIN = """
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return {'new', ''}
end
if fp ~= ARGV[1] then return {'mismatch', ''} end
local outcome = redis.call('HGET', KEYS[1], 'outcome')
if not outcome then return {'in_progress', ''} end
return {'done', outcome}
"""

# KEYS: the hash.  ARGV: fingerprint, outcome, ttl ms.
_FINISH = """
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'outcome', ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

# KEYS: the hash.  ARGV: fingerprint.  Only a running claim by this fingerprint is given back.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'outcome') == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _key(partner_id: str, key: str) -> str:
    return f"idempotency:{{{partner_id}}}:{key}"  # the partner's hash slot, like its quota keys (Redis Cluster)


class RedisIdempotency:
    def __init__(self, url: str, *, ttl_s: float, max_bytes: int, running_ttl_s: float, timeout_s: float = 2.0) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._begin = self._redis.register_script(_BEGIN)
        self._finish = self._redis.register_script(_FINISH)
        self._release = self._redis.register_script(_RELEASE)
        self._ttl_ms = int(ttl_s * 1000)
        self._running_ms = int(running_ttl_s * 1000)
        self._max_bytes = max_bytes

    async def begin(self, partner_id: str, key: str, fingerprint: str) -> Claim:
        try:
            result: Any = await self._begin(keys=[_key(partner_id, key)], args=[fingerprint, self._running_ms])
        except RedisError as exc:
            log.warning("idempotency store unreachable: %s", exc)
            raise Unavailable("cannot check the idempotency key now; retry shortly", retry_after_s=1.0) from exc
        state = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if state == "done":
            return Claim("done", bytes(result[1]))
        return Claim(state)  # type: ignore[arg-type]  # the script returns one of the ClaimState values

    async def finish(self, partner_id: str, key: str, fingerprint: str, outcome: bytes) -> None:
        stored = outcome if len(outcome) <= self._max_bytes else TOO_LARGE
        try:
            await self._finish(keys=[_key(partner_id, key)], args=[fingerprint, stored, self._ttl_ms])
        except RedisError as exc:  # the claim expires; the ledger still refuses to bill the id twice
            log.warning("could not store the outcome of idempotency key %s: %s", key, exc)

    async def release(self, partner_id: str, key: str, fingerprint: str) -> None:
        try:
            await self._release(keys=[_key(partner_id, key)], args=[fingerprint])
        except RedisError as exc:
            log.warning("could not release idempotency key %s: %s", key, exc)

    async def close(self) -> None:
        await self._redis.aclose()
