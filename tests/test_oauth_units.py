"""OAuth2 in-process: the token endpoint's RFC 6749 behaviour, token verification, key rotation, revocation
through the authenticator's cache, and scopes on API keys. The real stack: test_oauth.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI

from serving.errors import PermissionDenied, Unauthenticated
from serving.gateway.http_oauth import OAuthEndpoints, oauth_routes
from serving.identity.clients import OAuthClient
from serving.identity.scopes import parse_scopes
from serving.identity.tokens import TokenIssuer, TokenVerifier
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.storage.database import Database


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartnerStore]:
    store = PartnerStore(Database(str(tmp_path / "partners.db")))
    yield store
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _issuer(store: PartnerStore, clock: Clock) -> TokenIssuer:
    return TokenIssuer(store.client_owner, store.signing.signing_key, "serving", 900, clock=clock)


def _client(store: PartnerStore, scopes: str = "embed generate") -> tuple[OAuthClient, str]:
    partner = store.create_partner("acme", plan="unlimited")
    return store.clients.create(partner.id, "backend", parse_scopes(scopes))


def _app(store: PartnerStore, clock: Clock) -> httpx.AsyncClient:
    app = FastAPI()
    oauth_routes(app, OAuthEndpoints(_issuer(store, clock), store.signing.jwks))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


# --- the token endpoint ------------------------------------------------------------------------------------------


async def test_basic_and_body_client_authentication(store: PartnerStore, clock: Clock) -> None:
    client, secret = _client(store)
    async with _app(store, clock) as http:
        by_basic = await http.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, headers=_basic(client.client_id, secret)
        )
        by_body = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": client.client_id, "client_secret": secret},
        )
    for reply in (by_basic, by_body):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 900, "embed generate")
        assert reply.headers["cache-control"] == "no-store" and reply.headers["pragma"] == "no-cache"


def _form(**fields: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", **fields}


@pytest.mark.parametrize(
    ("case", "status", "error", "phrase"),
    [
        ("wrong secret", 401, "invalid_client", "wrong client_secret"),
        ("unknown client", 401, "invalid_client", "unknown client_id"),
        ("no client auth", 401, "invalid_client", "authenticate the client"),
        ("both auth methods", 400, "invalid_request", "not both"),
        ("password grant", 400, "unsupported_grant_type", "client_credentials"),
        ("JSON body", 400, "invalid_request", "application/x-www-form-urlencoded"),
        ("repeated parameter", 400, "invalid_request", "more than once: scope"),
        ("unknown scope", 400, "invalid_scope", "unknown scope(s) admin"),
        ("scope beyond the client's", 400, "invalid_scope", "may not request classify"),
        ("disabled client", 401, "invalid_client", "disabled"),
    ],
)
async def test_token_endpoint_errors_follow_rfc_6749(
    case: str, status: int, error: str, phrase: str, store: PartnerStore, clock: Clock
) -> None:
    client, secret = _client(store)
    basic = _basic(client.client_id, secret)
    request: dict[str, Any] = {"data": _form(), "headers": basic}
    if case == "wrong secret":
        request["headers"] = _basic(client.client_id, secret + "x")
    elif case == "unknown client":
        request["headers"] = _basic("oc_0000000000000000", secret)
    elif case == "no client auth":
        request["headers"] = {}
    elif case == "both auth methods":
        request["data"] = _form(client_id=client.client_id, client_secret=secret)
    elif case == "password grant":
        request["data"] = _form(grant_type="password")
    elif case == "JSON body":
        request = {"json": _form(), "headers": basic}
    elif case == "repeated parameter":
        request = {"content": "grant_type=client_credentials&scope=embed&scope=generate", "headers": basic}
        request["headers"] = {**basic, "content-type": "application/x-www-form-urlencoded"}
    elif case == "unknown scope":
        request["data"] = _form(scope="embed admin")
    elif case == "scope beyond the client's":
        request["data"] = _form(scope="embed classify")
    elif case == "disabled client":
        store.clients.set_disabled(client.client_id, True)
    async with _app(store, clock) as http:
        reply = await http.post("/oauth/token", **request)
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["error"] == error and phrase in body["error_description"], body
    assert reply.headers["cache-control"] == "no-store"
    if status == 401 and "authorization" in request["headers"]:
        assert reply.headers["www-authenticate"].startswith("Basic")


# --- verification ------------------------------------------------------------------------------------------------


async def test_verification_caches_until_expiry_and_refuses_after(store: PartnerStore, clock: Clock) -> None:
    client, secret = _client(store)
    token = _issuer(store, clock).issue(client.client_id, secret, "embed")["access_token"]
    loads: list[int] = []

    def load_keys() -> list[Any]:
        loads.append(1)
        return store.signing.public_keys()

    verifier = TokenVerifier(load_keys, "serving", 900, clock=clock)
    first = await verifier.verify(token)
    again = await verifier.verify(token)
    assert first is again and first.scopes == frozenset({"embed"}) and first.partner_id == client.partner_id
    assert len(loads) == 1  # one key load, then the cache
    clock.now += 900
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(token)


async def test_rotation_keeps_two_keys_valid_and_retires_the_third(store: PartnerStore, clock: Clock) -> None:
    client, secret = _client(store)
    issuer = _issuer(store, clock)
    old = issuer.issue(client.client_id, secret, None)["access_token"]
    new_kid, retired = store.signing.rotate()
    assert retired == []
    new = issuer.issue(client.client_id, secret, None)["access_token"]
    assert jwt.get_unverified_header(new)["kid"] == new_kid != jwt.get_unverified_header(old)["kid"]
    assert len(store.signing.jwks()["keys"]) == 2
    verifier = TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock)
    assert (await verifier.verify(old)).client_id == (await verifier.verify(new)).client_id == client.client_id
    _, retired = store.signing.rotate()
    assert retired == [jwt.get_unverified_header(old)["kid"]]
    fresh = TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock)
    assert (await fresh.verify(new)).client_id == client.client_id
    with pytest.raises(Unauthenticated, match="unknown or retired key"):
        await fresh.verify(old)


async def test_a_token_for_another_audience_is_refused(store: PartnerStore, clock: Clock) -> None:
    client, secret = _client(store)
    elsewhere = TokenIssuer(store.client_owner, store.signing.signing_key, "another-platform", 900, clock=clock)
    token = elsewhere.issue(client.client_id, secret, None)["access_token"]
    with pytest.raises(Unauthenticated, match="not for this API"):
        await TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock).verify(token)


async def test_disabling_the_client_or_partner_takes_effect_within_the_cache_ttl(
    store: PartnerStore, clock: Clock
) -> None:
    client, secret = _client(store)
    token = _issuer(store, clock).issue(client.client_id, secret, None)["access_token"]
    tokens = TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock)
    auth = Authenticator(store, ttl_s=2.0, clock=clock, tokens=tokens)
    caller = await auth.authenticate(token)
    assert (caller.partner_id, caller.key_id, caller.scopes) == (
        client.partner_id,
        client.client_id,
        frozenset({"embed", "generate"}),
    )
    store.clients.set_disabled(client.client_id, True)
    assert (await auth.authenticate(token)).key_id == client.client_id  # cached for up to the TTL
    clock.now += 2.01
    with pytest.raises(Unauthenticated, match="disabled"):
        await auth.authenticate(token)
    store.clients.set_disabled(client.client_id, False)
    store.set_disabled(client.partner_id, True)
    clock.now += 2.01
    with pytest.raises(PermissionDenied, match="partner is disabled"):
        await auth.authenticate(token)
    auth.close()


async def test_api_keys_carry_optional_scopes(store: PartnerStore, clock: Clock) -> None:
    partner = store.create_partner("scoped", plan="unlimited")
    everything = store.issue_key(partner.id)
    embed_only = store.issue_key(partner.id, parse_scopes("embed"))
    auth = Authenticator(store, ttl_s=2.0, clock=clock)
    assert (await auth.authenticate(everything)).scopes is None
    assert (await auth.authenticate(embed_only)).scopes == frozenset({"embed"})
    rotated = store.rotate_key(embed_only.split("_")[1])
    assert (await auth.authenticate(rotated)).scopes == frozenset({"embed"})  # a rotation keeps the scopes
    client, secret = _client(store)
    token = _issuer(store, clock).issue(client.client_id, secret, None)["access_token"]
    with pytest.raises(Unauthenticated, match="not accepted"):  # this authenticator has no token verifier
        await auth.authenticate(token)
    auth.close()


async def test_a_cached_token_is_refused_once_its_key_is_retired(store: PartnerStore, clock: Clock) -> None:
    client, secret = _client(store)
    token = _issuer(store, clock).issue(client.client_id, secret, None)["access_token"]
    verifier = TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock)
    assert (await verifier.verify(token)).client_id == client.client_id  # now cached
    store.signing.rotate()
    store.signing.rotate()  # the token's key is retired
    clock.now += 30
    assert (await verifier.verify(token)).client_id == client.client_id  # keys reloaded at most once a minute
    clock.now += 31
    with pytest.raises(Unauthenticated, match="unknown or retired key"):
        await verifier.verify(token)


def _forged(store: PartnerStore, client: OAuthClient, clock: Clock, lifetime: int, typ: str) -> str:
    """Signed with the real key (as after a key leak), with a lifetime and header the issuer never uses."""
    key, now = store.signing.signing_key(), int(clock.now)
    claims = {
        "iss": "serving", "aud": "serving", "sub": client.client_id, "client_id": client.client_id,
        "partner": client.partner_id, "scope": "embed", "iat": now, "exp": now + lifetime, "jti": "f",
    }  # fmt: skip
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid, "typ": typ})


@pytest.mark.parametrize(
    ("lifetime", "typ", "phrase"),
    [(3 * 365 * 86400, "at+jwt", "lifetime exceeds 900 s"), (600, "JWT", r"typ is not at\+jwt")],
)
async def test_tokens_the_issuer_never_makes_are_refused(
    lifetime: int, typ: str, phrase: str, store: PartnerStore, clock: Clock
) -> None:
    client, _ = _client(store)
    with pytest.raises(Unauthenticated, match=phrase):
        await TokenVerifier(store.signing.public_keys, "serving", 900, clock=clock).verify(
            _forged(store, client, clock, lifetime, typ)
        )
