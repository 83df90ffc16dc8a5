"""API key → partner and plan, with a short-lived cache so the hot path rarely touches the database.

The cache TTL bounds how long a revocation, a disabled partner or a plan change takes to reach this
gateway replica (default 2 s, well inside the promised 5 s). Lookups never run SQL on the event loop: a
miss goes to the authenticator's own few threads (so admin and usage queries filling the loop's default
executor cannot hold up key checks), and concurrent misses for one key id share that one lookup (single
flight). The cache holds at most ``max_entries`` key ids and evicts the least recently used one at a time,
so a flood of unknown keys cannot empty it for everyone else.

**Stale if error.** When the partner database is unreachable (the store raises ``Unavailable``), a key whose
entry expired less than ``stale_if_error_s`` ago (default 300 s) is answered from that entry, so a database
restart or dropped connections do not reject keys that were just in use. While the database is known to be
down (the last lookup failed), such keys are answered at once and a refresh runs in the background (one per
key); the first lookup that succeeds ends the outage. A key without a recent entry gets UNAVAILABLE / 503
with retry-after. The price: a revocation, disable or plan change made just before the outage reaches this
replica only once the database is back (at most TTL + ``stale_if_error_s`` late).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from serving.domain import Caller
from serving.errors import CredentialsMissing, PermissionDenied, Unauthenticated, Unavailable
from serving.identity.clients import ClientOwner, is_client_id
from serving.identity.tokens import TokenVerifier, looks_like_jwt
from serving.partners.keys import matches, parse_key
from serving.partners.store import KeyOwner

Owner = KeyOwner | ClientOwner

log = logging.getLogger("serving.auth")

_MAX_CACHED = 100_000
_STALE_IF_ERROR_S = 300.0
_LOOKUP_THREADS = 4


class KeyDirectory(Protocol):
    """Where keys and OAuth clients are looked up (``PartnerStore``); raises ``Unavailable`` when its database is
    unreachable."""

    def key_owner(self, key_id: str) -> KeyOwner | None: ...

    def client_owner(self, client_id: str) -> ClientOwner | None: ...


class Authenticator:
    def __init__(
        self,
        store: KeyDirectory,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = _MAX_CACHED,
        stale_if_error_s: float = _STALE_IF_ERROR_S,
        lookup_threads: int = _LOOKUP_THREADS,
        tokens: TokenVerifier | None = None,
    ) -> None:
        self._store = store
        self._tokens = tokens  # None: access tokens are not accepted (no OAuth on this gateway)
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._stale_s = stale_if_error_s
        # key id or OAuth client id -> (expires, owner)
        self._cache: OrderedDict[str, tuple[float, Owner | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Owner | None]] = {}
        self._executor = ThreadPoolExecutor(lookup_threads, thread_name_prefix="key-lookup")
        self._store_down = False  # the last lookup found the database unreachable
        self.stale_answers = 0  # keys answered from an expired entry because the database was unreachable

    async def _lookup(self, key_id: str) -> Owner | None:
        now = self._clock()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key_id)
            return hit[1]
        lookup = self._inflight.get(key_id)
        if lookup is None:  # the first miss asks the database; concurrent misses for this key id share it
            find: Callable[[str], Owner | None] = (
                self._store.client_owner if is_client_id(key_id) else self._store.key_owner
            )
            lookup = asyncio.get_running_loop().run_in_executor(self._executor, find, key_id)
            self._inflight[key_id] = lookup
            lookup.add_done_callback(lambda done: self._settled(key_id, done))
        stale = hit is not None and hit[0] + self._stale_s > now
        if stale and self._store_down:
            return self._answer_stale(key_id, hit)  # the lookup goes on and refreshes the entry if it succeeds
        try:
            # Shielded: a caller that gives up (cancelled) does not cancel the lookup the others wait on.
            return await asyncio.shield(lookup)
        except Unavailable as exc:
            if stale:
                return self._answer_stale(key_id, hit)
            raise Unavailable(
                "cannot check the API key now: the partner database is unreachable; retry shortly",
                retry_after_s=exc.retry_after_s or 1.0,
            ) from exc

    def _answer_stale(self, key_id: str, hit: tuple[float, Owner | None] | None) -> Owner | None:
        assert hit is not None
        self.stale_answers += 1
        self._cache.move_to_end(key_id)
        return hit[1]

    def _settled(self, key_id: str, lookup: asyncio.Future[Owner | None]) -> None:
        del self._inflight[key_id]
        if lookup.cancelled():
            return
        error = lookup.exception()  # retrieved here, so a lookup nobody awaits (stale answer) logs no warning
        if error is None:
            if self._store_down:
                self._store_down = False
                log.warning("partner database reachable again; key lookups resumed")
            self._remember(key_id, lookup.result())
        elif isinstance(error, Unavailable) and not self._store_down:
            self._store_down = True  # logged once per outage
            log.error(
                "partner database unreachable (%s); keys seen in the last %.0f s are answered from the cache",
                error.__cause__ or error,
                self._stale_s,
            )

    def _remember(self, key_id: str, owner: Owner | None) -> None:
        self._cache[key_id] = (self._clock() + self._ttl_s, owner)
        self._cache.move_to_end(key_id)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def authenticate(self, api_key: str | None) -> Caller:
        """An API key or an OAuth access token (both sent as ``Bearer``) → the caller, with its scopes."""
        if not api_key:
            raise CredentialsMissing("missing API key: send 'authorization: Bearer <key>'", param="authorization")
        if looks_like_jwt(api_key):
            return await self._authenticate_token(api_key)
        parsed = parse_key(api_key)
        owner = await self._lookup(parsed.key_id) if parsed else None
        if parsed is None or not isinstance(owner, KeyOwner) or not matches(parsed, owner.key.digest):
            raise Unauthenticated("unknown API key", param="authorization")
        if owner.key.revoked:
            raise Unauthenticated("this API key was revoked; ask for a new one", param="authorization")
        if owner.partner.disabled:
            raise PermissionDenied("this partner is disabled; contact support", param="authorization")
        return Caller(partner_id=owner.partner.id, key_id=owner.key.key_id, plan=owner.plan, scopes=owner.key.scopes)

    async def _authenticate_token(self, token: str) -> Caller:
        """Signature, expiry and claims are checked locally (the verifier caches each token until it expires); the
        client's state comes through the same TTL cache as keys, so disabling a client or its partner takes effect
        within ``ttl_s`` (during a database outage, within ``stale_if_error_s``), not at the token's expiry."""
        if self._tokens is None:
            raise Unauthenticated("access tokens are not accepted by this gateway", param="authorization")
        claims = await self._tokens.verify(token)
        owner = await self._lookup(claims.client_id)
        if not isinstance(owner, ClientOwner):
            raise Unauthenticated("the OAuth client of this access token no longer exists", param="authorization")
        if owner.partner.id != claims.partner_id:
            raise Unauthenticated(
                f"this access token was issued for partner {claims.partner_id}, not for its client's partner",
                param="authorization",
            )
        if owner.client.disabled:
            raise Unauthenticated("the OAuth client of this access token is disabled", param="authorization")
        if owner.partner.disabled:
            raise PermissionDenied("this partner is disabled; contact support", param="authorization")
        # Never more than the client holds now, whatever the token says.
        scopes = claims.scopes & owner.client.scopes
        return Caller(partner_id=owner.partner.id, key_id=claims.client_id, plan=owner.plan, scopes=scopes)

    def close(self) -> None:
        """Lets the lookup threads go (lookups still running finish on their own)."""
        self._executor.shutdown(wait=False)
