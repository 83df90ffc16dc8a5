"""API key → partner, with a short-lived cache so the hot path rarely touches the database.

The cache TTL bounds how long a revoked key keeps working on this gateway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serving.domain import Caller
from serving.errors import PermissionDenied, Unauthenticated
from serving.partners.keys import matches, parse_key
from serving.partners.store import PartnerStore, StoredKey

_MAX_CACHED = 100_000


class Authenticator:
    def __init__(self, store: PartnerStore, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, StoredKey | None]] = {}

    def _lookup(self, key_id: str) -> StoredKey | None:
        now = self._clock()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        stored = self._store.key(key_id)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key_id] = (now + self._ttl_s, stored)
        return stored

    def authenticate(self, api_key: str | None) -> Caller:
        if not api_key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'", param="authorization")
        parsed = parse_key(api_key)
        stored = self._lookup(parsed.key_id) if parsed else None
        if parsed is None or stored is None or not matches(parsed, stored.digest):
            raise Unauthenticated("unknown API key", param="authorization")
        if not stored.active:
            raise PermissionDenied("this API key is revoked or its partner is disabled", param="authorization")
        return Caller(partner_id=stored.partner_id, key_id=stored.key_id)
