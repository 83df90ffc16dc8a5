"""The OAuth2 routes of the partner port: ``POST /oauth/token`` (RFC 6749 §4.4, client credentials) and the
public signing keys at ``GET /.well-known/jwks.json`` (also on the ops listener).

The token endpoint takes a form-encoded body; the client authenticates with HTTP Basic (RFC 6749 §2.3.1:
form-urlencoded id and secret) or with ``client_id`` / ``client_secret`` in the body, never both. Errors are
RFC 6749 §5.2 bodies (``error``, ``error_description``), not the API's own error shape: OAuth client libraries
parse these.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.identity.tokens import OAuthError, TokenIssuer

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class OAuthEndpoints:
    issuer: TokenIssuer
    jwks: Callable[[], dict[str, Any]]  # blocking (a database read)


def jwks_route(app: FastAPI, jwks: Callable[[], dict[str, Any]]) -> None:
    @app.get("/.well-known/jwks.json", tags=["oauth"])
    async def signing_keys() -> JSONResponse:
        """The public keys that verify access tokens (RFC 7517); at most two during a rotation."""
        return JSONResponse(await asyncio.to_thread(jwks), headers={"Cache-Control": "public, max-age=60"})


def oauth_routes(app: FastAPI, oauth: OAuthEndpoints) -> None:
    jwks_route(app, oauth.jwks)

    @app.post("/oauth/token", tags=["oauth"])
    async def token(request: Request) -> JSONResponse:
        """An access token for an OAuth client (``grant_type=client_credentials``)."""
        basic = request.headers.get("authorization", "").lower().startswith("basic ")
        try:
            form = await _form(request)
            if not form.get("grant_type"):
                raise OAuthError("invalid_request", "grant_type is required: grant_type=client_credentials")
            if form.get("grant_type") != "client_credentials":
                raise OAuthError(
                    "unsupported_grant_type",
                    f"grant_type must be client_credentials; got {form.get('grant_type')!r}",
                )
            client_id, secret = _client_credentials(request, form)
            reply = await asyncio.to_thread(oauth.issuer.issue, client_id, secret, form.get("scope"))
        except OAuthError as exc:
            headers = dict(_NO_STORE)
            if exc.status == 401 and basic:
                headers["WWW-Authenticate"] = 'Basic realm="serving", charset="UTF-8"'
            body = {"error": exc.error, "error_description": exc.description}
            return JSONResponse(body, status_code=exc.status, headers=headers)
        return JSONResponse(reply, headers=_NO_STORE)


async def _form(request: Request) -> dict[str, str]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != _FORM:
        raise OAuthError("invalid_request", f"send the token request as {_FORM}; got {media_type or 'no body type'}")
    try:
        parsed = parse_qs((await request.body()).decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise OAuthError("invalid_request", "the form body is not UTF-8") from exc
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:  # RFC 6749 §3.2: request parameters must not be included more than once
        raise OAuthError("invalid_request", f"parameter(s) sent more than once: {', '.join(repeated)}")
    return {name: values[0] for name, values in parsed.items()}


def _client_credentials(request: Request, form: dict[str, str]) -> tuple[str, str]:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    in_body = "client_secret" in form
    if scheme.lower() == "basic":
        if in_body:
            raise OAuthError("invalid_request", "authenticate the client once: HTTP Basic or the body, not both")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise OAuthError("invalid_client", "malformed HTTP Basic credentials", 401) from exc
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "HTTP Basic credentials need client_id:client_secret", 401)
        return unquote_plus(client_id), unquote_plus(secret)
    if not in_body or not form.get("client_id"):
        raise OAuthError(
            "invalid_client",
            "authenticate the client: HTTP Basic (client_id:client_secret) or client_id and client_secret in the body",
            401,
        )
    return form["client_id"], form["client_secret"]
