"""Idempotency keys shared by every gateway replica: one Redis hash per partner and key, changed by Lua functions
so that claiming, finishing and releasing are atomic (sent through ``RedisBatch``, with the quota's operations).
The hash lives ``running_ttl_s`` while its request runs (a replica that dies mid-request frees the key then; the
ledger still refuses to bill the id twice) and ``ttl_s`` once the outcome is stored.

When Redis cannot be reached a request with a key is refused (UNAVAILABLE, retry-after) whatever the quota's
failure policy: running it without its claim could run it twice. Requests without a key never touch this store.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from redis.exceptions import RedisError

from serving.errors import Unavailable
from serving.idempotency.store import TOO_LARGE, Claim
from serving.storage.redis_batch import RedisBatch

log = logging.getLogger("serving.idempotency")
_UNREACHABLE = (RedisError, TimeoutError)

# KEYS: the hash.  ARGV: fingerprint, running ttl ms, claim token.  Returns {state, outcome or ''}.
# The token makes a claim sent twice (its batch resent after a broken connection) still the claimer's.
_BEGIN = """
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'claim', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return {'new', ''}
end
if fp ~= ARGV[1] then return {'mismatch', ''} end
local outcome = redis.call('HGET', KEYS[1], 'outcome')
if not outcome then
  if redis.call('HGET', KEYS[1], 'claim') == ARGV[3] then return {'new', ''} end
  return {'in_progress', ''}
end
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
    def __init__(
        self, redis: str | RedisBatch, *, ttl_s: float, max_bytes: int, running_ttl_s: float, timeout_s: float = 2.0
    ) -> None:
        # A URL: this store's own batch; a RedisBatch: shared with the quota (claims ride the same round trip).
        self._owns_batch = isinstance(redis, str)
        self._batch = RedisBatch(redis, timeout_s=timeout_s) if isinstance(redis, str) else redis
        for name, body in (("idem_begin", _BEGIN), ("idem_finish", _FINISH), ("idem_release", _RELEASE)):
            self._batch.register(name, body)
        self._ttl_ms = int(ttl_s * 1000)
        self._running_ms = int(running_ttl_s * 1000)
        self._max_bytes = max_bytes

    async def _call(self, name: str, key: str, args: list[Any]) -> Any:
        return await self._batch.call(name, [key], args)  # bounded by the connection's timeout per round trip

    async def begin(self, partner_id: str, key: str, fingerprint: str) -> Claim:
        try:
            args = [fingerprint, self._running_ms, uuid.uuid4().hex]
            result: Any = await self._call("idem_begin", _key(partner_id, key), args)
        except _UNREACHABLE as exc:
            log.warning("idempotency store unreachable: %s", exc)
            raise Unavailable("cannot check the idempotency key now; retry shortly", retry_after_s=1.0) from exc
        state = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if state == "done":
            return Claim("done", bytes(result[1]))
        return Claim(state)  # type: ignore[arg-type]  # the script returns one of the ClaimState values

    async def finish(
        self, partner_id: str, key: str, fingerprint: str, outcome: bytes, ttl_s: float | None = None
    ) -> None:
        stored = outcome if len(outcome) <= self._max_bytes else TOO_LARGE
        ttl_ms = self._ttl_ms if ttl_s is None else int(ttl_s * 1000)
        try:
            await self._call("idem_finish", _key(partner_id, key), [fingerprint, stored, ttl_ms])
        except _UNREACHABLE as exc:  # the claim expires; the ledger still refuses to bill the id twice
            log.warning("could not store the outcome of idempotency key %s: %s", key, exc)

    async def release(self, partner_id: str, key: str, fingerprint: str) -> None:
        try:
            await self._call("idem_release", _key(partner_id, key), [fingerprint])
        except _UNREACHABLE as exc:
            log.warning("could not release idempotency key %s: %s", key, exc)

    async def close(self) -> None:
        if self._owns_batch:
            await self._batch.close()
