"""API key → partner and plan, with a short-lived cache so the hot path rarely touches the database.

The cache TTL bounds how long a revocation, a disabled partner or a plan change takes to reach this
gateway replica (default 2 s, well inside the promised 5 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serving.domain import Caller
from serving.errors import PermissionDenied, Unauthenticated
from serving.partners.keys import matches, parse_key
from serving.partners.store import KeyOwner, PartnerStore

_MAX_CACHED = 100_000


class Authenticator:
    def __init__(self, store: PartnerStore, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, KeyOwner | None]] = {}

    def _lookup(self, key_id: str) -> KeyOwner | None:
        now = self._clock()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        owner = self._store.key_owner(key_id)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key_id] = (now + self._ttl_s, owner)
        return owner

    def authenticate(self, api_key: str | None) -> Caller:
        if not api_key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'", param="authorization")
        parsed = parse_key(api_key)
        owner = self._lookup(parsed.key_id) if parsed else None
        if parsed is None or owner is None or not matches(parsed, owner.key.digest):
            raise Unauthenticated("unknown API key", param="authorization")
        if owner.key.revoked:
            raise Unauthenticated("this API key was revoked; ask for a new one", param="authorization")
        if owner.partner.disabled:
            raise PermissionDenied("this partner is disabled; contact support", param="authorization")
        return Caller(partner_id=owner.partner.id, key_id=owner.key.key_id, plan=owner.plan)
