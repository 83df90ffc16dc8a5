"""Access tokens: issued by ``POST /oauth/token`` (client credentials), verified by every gateway replica locally.

A token is a JWT (RFC 9068 profile: header ``typ: at+jwt``, ``kid``; claims ``iss``, ``aud``, ``sub`` and
``client_id`` = the OAuth client, ``partner``, ``scope``, ``iat``, ``exp``, ``jti``) signed with EdDSA. Only EdDSA
is accepted, so ``alg: none`` and algorithm confusion are refused before any key is used. Verification needs the
public keys only; they are loaded from the database at startup and again when a token names an unknown ``kid``
(a rotation on another replica) or after ``_KEYS_MAX_AGE_S`` (retired keys drop out). A verified token is cached
until it expires, so a partner's repeated calls cost a dict lookup, as an API key's do.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from serving.errors import Unauthenticated
from serving.identity.clients import ClientOwner, secret_matches
from serving.identity.scopes import ScopeError, format_scopes, parse_scopes
from serving.identity.signing import PublicKey, SigningKey

ALGORITHM = "EdDSA"
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "partner", "scope"]
_MAX_CACHED = 100_000
_KEYS_MAX_AGE_S = 60.0
_UNKNOWN_KID_REFRESH_S = 1.0  # at most one key reload per second for unknown kids (forged tokens cannot flood it)
_RETRY_RELOAD_S = 5.0
_CLOCK_SKEW_S = 60.0  # between the replica that issued a token and the one verifying it

log = logging.getLogger("serving.auth")


def looks_like_jwt(credential: str) -> bool:
    """A JWT (three base64url parts, a JSON header) rather than an API key (``sk_...``)."""
    return credential.startswith("eyJ") and credential.count(".") == 2


@dataclass(frozen=True)
class AccessToken:
    client_id: str
    partner_id: str
    scopes: frozenset[str]
    expires_at: float
    kid: str  # the key that signed it: once that key is retired, the cached token is refused too


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response of the token endpoint."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


class TokenIssuer:
    """Client credentials → a signed access token. Blocking (database reads): run it on a thread."""

    def __init__(
        self,
        owner_of: Callable[[str], ClientOwner | None],
        signing_key: Callable[[], SigningKey],
        issuer: str,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._owner_of, self._signing_key = owner_of, signing_key
        self._issuer, self._ttl_s, self._clock = issuer, ttl_s, clock

    def issue(self, client_id: str, secret: str, scope: str | None) -> dict[str, Any]:
        owner = self._owner_of(client_id) if client_id else None
        if owner is None or not secret_matches(owner, secret):
            raise OAuthError("invalid_client", "unknown client_id or wrong client_secret", 401)
        if owner.client.disabled:
            raise OAuthError("invalid_client", "this OAuth client is disabled", 401)
        if owner.partner.disabled:
            raise OAuthError("invalid_client", "this partner is disabled; contact support", 401)
        granted = owner.client.scopes
        if scope is not None and scope.strip():
            try:
                requested = parse_scopes(scope)
            except ScopeError as exc:
                raise OAuthError("invalid_scope", str(exc)) from exc
            beyond = requested - granted
            if beyond:
                raise OAuthError(
                    "invalid_scope",
                    f"this client may not request {format_scopes(beyond)}; its scopes are: {format_scopes(granted)}",
                )
            granted = requested
        now = int(self._clock())
        key = self._signing_key()
        claims = {
            "iss": self._issuer,
            "aud": self._issuer,
            "sub": owner.client.client_id,
            "client_id": owner.client.client_id,
            "partner": owner.partner.id,
            "scope": format_scopes(granted),
            "iat": now,
            "exp": now + int(self._ttl_s),
            "jti": secrets.token_hex(12),
        }
        token = jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "at+jwt"})
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self._ttl_s),
            "scope": claims["scope"],
        }


class TokenVerifier:
    """Verifies access tokens against the public keys; caches verified tokens until they expire."""

    def __init__(
        self,
        load_keys: Callable[[], list[PublicKey]],
        issuer: str,
        max_ttl_s: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = _MAX_CACHED,
    ) -> None:
        self._load_keys, self._issuer, self._clock = load_keys, issuer, clock
        self._max_ttl_s = max_ttl_s  # a token that claims a longer life was not issued by POST /oauth/token
        self._max_entries = max_entries
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._loaded_at = -1e18
        self._reload: asyncio.Future[None] | None = None
        self._cache: OrderedDict[str, AccessToken] = OrderedDict()

    async def verify(self, token: str) -> AccessToken:
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            if now - self._loaded_at > _KEYS_MAX_AGE_S:
                await self.reload()  # once a minute: a retired key's tokens leave the cache too
            if hit.expires_at > now and hit.kid in self._keys:
                return hit
            del self._cache[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"malformed access token: {exc}", param="authorization") from exc
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated(
                f"access tokens are signed with {ALGORITHM}; this one declares alg {header.get('alg')!r} and is"
                " refused. Fetch a token from POST /oauth/token",
                param="authorization",
            )
        if str(header.get("typ", "")).lower() not in ("at+jwt", "application/at+jwt"):  # RFC 9068 §4
            raise Unauthenticated("not an access token (its header typ is not at+jwt)", param="authorization")
        kid = str(header.get("kid", ""))
        verified = self._decode(token, await self._key(kid, now), kid)
        self._cache[token] = verified
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return verified

    async def _key(self, kid: str, now: float) -> Ed25519PublicKey:
        stale = now - self._loaded_at > _KEYS_MAX_AGE_S
        if stale or (kid not in self._keys and now - self._loaded_at > _UNKNOWN_KID_REFRESH_S):
            await self.reload()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(
                f"access token signed by an unknown or retired key (kid {kid!r}); fetch a new token",
                param="authorization",
            )
        return key

    async def reload(self) -> None:
        """Reloads the public keys off the event loop; concurrent callers share one reload. When the database cannot
        answer, the keys already loaded stay in use (and are retried a few seconds later)."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._load())
        await asyncio.shield(self._reload)

    async def _load(self) -> None:
        try:
            keys = await asyncio.to_thread(self._load_keys)
        except Exception:
            if not self._keys:
                raise
            log.warning("cannot reload the token signing keys; verifying with the ones loaded", exc_info=True)
            self._loaded_at = self._clock() - _KEYS_MAX_AGE_S + _RETRY_RELOAD_S
            return
        self._keys = {key.kid: key.key for key in keys}
        self._loaded_at = self._clock()

    def _decode(self, token: str, key: Ed25519PublicKey, kid: str) -> AccessToken:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._issuer,
                issuer=self._issuer,
                # Times are checked below against this verifier's clock (the one its cache uses too).
                options={"require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("access token signature does not verify", param="authorization") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise Unauthenticated(f"access token is not for this API ({exc})", param="authorization") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid access token: {exc}", param="authorization") from exc
        now = self._clock()
        if float(claims["exp"]) <= now:
            raise Unauthenticated("access token expired; fetch a new one from POST /oauth/token", param="authorization")
        if float(claims["iat"]) > now + _CLOCK_SKEW_S:
            raise Unauthenticated("access token issued in the future; check the issuer's clock", param="authorization")
        if float(claims["exp"]) - float(claims["iat"]) > self._max_ttl_s + _CLOCK_SKEW_S:
            raise Unauthenticated(
                f"access token lifetime exceeds {self._max_ttl_s:.0f} s; it was not issued here", param="authorization"
            )
        try:
            scopes = parse_scopes(str(claims["scope"]))
        except ScopeError as exc:
            raise Unauthenticated(f"invalid access token: {exc}", param="authorization") from exc
        return AccessToken(str(claims["sub"]), str(claims["partner"]), scopes, float(claims["exp"]), kid)
