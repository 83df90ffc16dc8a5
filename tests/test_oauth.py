"""OAuth2 client credentials through the real stack: a token from POST /oauth/token works with the official
``openai`` client and the SDK, is metered to the partner and the client id, and each kind of bad token is refused
on both front doors with the right code and a message that says what is wrong."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import httpx
import jwt
import openai
import pytest

from serving.gateway.app import Gateway
from serving.identity.clients import OAuthClient
from serving.identity.scopes import parse_scopes
from serving.identity.tokens import TokenIssuer
from serving.partners.store import PartnerStore
from serving_sdk import NO_RETRIES, ApiError, AsyncClient

EMBED = "minilm-l6"
GEN = "smollm2-135m-instruct"


def _client(store: PartnerStore, scopes: str = "embed classify generate usage:read") -> tuple[OAuthClient, str]:
    partner = store.create_partner(f"oauth-{uuid.uuid4().hex[:6]}", plan="unlimited")
    return store.clients.create(partner.id, "backend", parse_scopes(scopes))


async def _token(http_base: str, client: OAuthClient, secret: str, **form: str) -> dict[str, Any]:
    basic = base64.b64encode(f"{client.client_id}:{secret}".encode()).decode()
    async with httpx.AsyncClient(base_url=http_base) as http:
        reply = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", **form},
            headers={"authorization": f"Basic {basic}"},
        )
    assert reply.status_code == 200, reply.text
    assert reply.headers["cache-control"] == "no-store"
    return dict(reply.json())


async def _ledger_key_ids(gateway: Gateway, partner_id: str) -> list[str]:
    await asyncio.to_thread(gateway.ledger.flush)
    rows = gateway.ledger.db.query(
        "SELECT key_id FROM usage_records WHERE partner_id = ? AND status = 'ok' ORDER BY started_at", (partner_id,)
    )
    return [str(row[0]) for row in rows]


async def test_openai_client_and_sdk_work_with_an_access_token(
    gateway: Gateway, http_base: str, grpc_target: str, store: PartnerStore
) -> None:
    client, secret = _client(store)
    token = await _token(http_base, client, secret)
    assert token["token_type"] == "Bearer" and token["expires_in"] == 900
    assert token["scope"] == "embed classify generate usage:read"
    header = jwt.get_unverified_header(token["access_token"])
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt" and header["kid"].startswith("k_")

    oai = openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=token["access_token"], max_retries=0)
    embedded = await oai.embeddings.create(model=EMBED, input=["hello", "world"])
    chat = await oai.chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0
    )
    await oai.close()
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) == 384
    assert chat.usage is not None and chat.usage.completion_tokens >= 1

    async with AsyncClient(grpc_target, token["access_token"], retry=NO_RETRIES) as sdk:
        vectors = await sdk.embed(["through gRPC"])
    assert len(vectors.embeddings) == 1

    # Metered to the partner, under the client id (the ledger's key_id), once per call.
    assert await _ledger_key_ids(gateway, client.partner_id) == [client.client_id] * 3


async def test_a_narrower_token_and_the_jwks(http_base: str, ops_base: str, store: PartnerStore) -> None:
    client, secret = _client(store, "embed generate")
    token = await _token(http_base, client, secret, scope="embed")
    assert token["scope"] == "embed"
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["client_id"], claims["partner"]) == (client.client_id,) * 2 + (client.partner_id,)
    assert claims["exp"] - claims["iat"] == 900
    async with httpx.AsyncClient() as http:
        partner_jwks = (await http.get(f"{http_base}/.well-known/jwks.json")).json()
        ops_jwks = (await http.get(f"{ops_base}/.well-known/jwks.json")).json()
    assert partner_jwks == ops_jwks
    kids = [key["kid"] for key in partner_jwks["keys"]]
    assert jwt.get_unverified_header(token["access_token"])["kid"] in kids
    assert all(set(key) == {"kty", "crv", "x", "kid", "alg", "use"} for key in partner_jwks["keys"])  # no "d"
    # The verifying key from the JWKS checks the token, as a partner's own service could.
    public = jwt.PyJWK(partner_jwks["keys"][kids.index(jwt.get_unverified_header(token["access_token"])["kid"])])
    jwt.decode(token["access_token"], public.key, algorithms=["EdDSA"], audience="serving")


def _bad_tokens(
    store: PartnerStore, client: OAuthClient, secret: str, good: str
) -> dict[str, tuple[str, str, str, str]]:
    """name → (token, gRPC code, HTTP error code, a phrase the message must contain)."""
    key = store.signing.signing_key()
    other = store.create_partner(f"oauth-other-{uuid.uuid4().hex[:6]}", plan="unlimited")
    now = int(time.time())
    claims = {
        "iss": "serving", "aud": "serving", "sub": client.client_id, "client_id": client.client_id,
        "partner": other.id, "scope": "embed generate", "iat": now, "exp": now + 600, "jti": "x",
    }  # fmt: skip
    other_partner = jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid, "typ": "at+jwt"})
    expired = TokenIssuer(store.client_owner, store.signing.signing_key, "serving", 900, clock=lambda: now - 3600)
    header, payload, signature = good.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    none_alg = jwt.encode({**claims, "partner": client.partner_id}, None, algorithm="none")
    return {
        "another partner": (other_partner, "UNAUTHENTICATED", "invalid_api_key", "issued for partner"),
        "expired": (
            expired.issue(client.client_id, secret, None)["access_token"],
            "UNAUTHENTICATED",
            "invalid_api_key",
            "expired",
        ),
        "bad signature": (f"{header}.{payload}.{flipped}", "UNAUTHENTICATED", "invalid_api_key", "signature"),
        "missing scope": (good, "PERMISSION_DENIED", "insufficient_scope", "lacks the 'classify' scope"),
        "none algorithm": (none_alg, "UNAUTHENTICATED", "invalid_api_key", "alg 'none'"),
    }


@pytest.mark.parametrize("case", ["another partner", "expired", "bad signature", "missing scope", "none algorithm"])
async def test_bad_tokens_are_refused_on_both_doors(
    case: str, http_base: str, grpc_target: str, store: PartnerStore
) -> None:
    client, secret = _client(store, "embed generate")
    good = (await _token(http_base, client, secret))["access_token"]
    token, grpc_code, http_code, phrase = _bad_tokens(store, client, secret, good)[case]
    body = {"model": "zero-shot", "texts": ["a fine day"], "labels": ["weather", "sports"]}
    async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {token}"}) as http:
        reply = await http.post("/v1/classify", json=body)
    assert reply.status_code == (403 if grpc_code == "PERMISSION_DENIED" else 401), reply.text
    error = reply.json()["error"]
    assert error["code"] == http_code and phrase in error["message"], error
    challenge = 'error="insufficient_scope", scope="classify"' if grpc_code == "PERMISSION_DENIED" else "invalid_token"
    assert reply.headers["www-authenticate"].startswith("Bearer") and challenge in reply.headers["www-authenticate"]
    async with AsyncClient(grpc_target, token, retry=NO_RETRIES) as sdk:
        with pytest.raises(ApiError) as raised:
            await sdk.classify(["a fine day"], ["weather", "sports"])
    assert raised.value.code == grpc_code and phrase in raised.value.message, raised.value
