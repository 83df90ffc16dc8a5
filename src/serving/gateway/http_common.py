"""What both HTTP route modules share: call context from headers, the error response, body limits, SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import (
    CredentialsMissing,
    InsufficientScope,
    InvalidInput,
    PayloadTooLarge,
    RouteNotFound,
    ServingError,
    Unauthenticated,
    describe,
    openai_type_code,
    public_message,
    retryable,
)
from serving.gateway import http_schemas as schemas
from serving.gateway.core import CallContext
from serving.gateway.headers import response_pairs, retry_after, retry_after_ms
from serving.gateway.stream import EventStream

log = logging.getLogger("serving.http")

# What readiness reports: "ready", or why not ("loading" while models start, "draining" on a graceful stop,
# "drained" once every request of that stop finished and was stored). Called on the event loop: it must not block.
ReadyCheck = Callable[[], str]


@dataclass(frozen=True)
class HttpConfig:
    max_request_bytes: int
    timeout_s: float


def error_response(exc: BaseException, *, openai: bool = False) -> JSONResponse:
    """The error body and headers; ``openai``: with OpenAI's codes (the OpenAI-compatible routes)."""
    kind = describe(exc)
    type_, code = openai_type_code(exc) if openai else (kind.type, kind.code)
    param = exc.param if isinstance(exc, ServingError) else None
    headers = {}
    if isinstance(exc, ServingError) and exc.retry_after_s is not None:
        headers["retry-after"] = retry_after(exc.retry_after_s)
        headers["retry-after-ms"] = retry_after_ms(exc.retry_after_s)
        if not retryable(exc):
            headers["x-should-retry"] = "false"  # OpenAI's clients would otherwise retry a 429 that cannot pass
    challenge = bearer_challenge(exc)
    if challenge:
        headers["www-authenticate"] = challenge
    body = schemas.error_body(public_message(exc), type_, code, param)
    return JSONResponse(body, status_code=kind.http_status, headers=headers)


def bearer_challenge(exc: BaseException) -> str | None:
    """RFC 6750 §3: what a 401, or a 403 for a missing scope, says about the bearer credential."""
    if isinstance(exc, InsufficientScope):
        return f'Bearer realm="serving", error="insufficient_scope", scope="{exc.scope}"'
    if isinstance(exc, CredentialsMissing):
        return 'Bearer realm="serving"'
    if isinstance(exc, Unauthenticated):
        return 'Bearer realm="serving", error="invalid_token"'
    return None


def validation_error(exc: RequestValidationError) -> ServingError:
    """FastAPI's body validation failure as the domain error naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON (UTF-8): {first.get('ctx', {}).get('error', '')}".strip()
        return InvalidInput(message)
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return InvalidInput(message, param=param or None)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc))


class BodyLimit:
    """Rejects bodies over the limit with 413 before they are parsed (declared or streamed length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"the body is larger than {self.max_bytes} bytes; send less per call")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        try:
            await self.app(scope, limited, send)
        except PayloadTooLarge as exc:
            await error_response(exc)(scope, receive, send)


class ResponseHeaders:
    """Adds the call's request id and rate-limit headers to every response, errors and streams included.

    The route stores the call's ``ResponseMeta`` in ``request.state``; the core fills it before any byte
    of the response is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                meta = scope.get("state", {}).get("meta")
                if meta is not None:
                    extra = [(k.encode(), v.encode()) for k, v in response_pairs(meta)]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def call_context(request: Request, config: HttpConfig) -> CallContext:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    timeout = config.timeout_s
    raw = request.headers.get("x-request-timeout")
    if raw:
        try:
            timeout = min(timeout, max(float(raw), 0.0))
        except ValueError as exc:
            raise InvalidInput("x-request-timeout must be a number of seconds", param="x-request-timeout") from exc
    ctx = CallContext(
        api_key=token.strip() if scheme.lower() == "bearer" else None,
        timeout_s=timeout,
        peer=request.client.host if request.client else None,
        correlation_id=request.headers.get("x-request-id"),
        retry_scoped_key=request.headers.get("idempotency-scope") == "retry",
        traceparent=request.headers.get("traceparent"),  # W3C trace context
        tracestate=request.headers.get("tracestate"),
    )
    request.state.meta = ctx.meta
    return ctx


def request_id_header(request: Request) -> str:
    """The idempotency key of an HTTP call: ``Idempotency-Key`` (``x-request-id`` only correlates; never a key)."""
    return request.headers.get("idempotency-key") or ""


def sse(events: AsyncIterator[str], stream: EventStream) -> StreamingResponse:
    """Server-sent events from ``events`` (rendered from ``stream``). The stream is closed once the response
    ends, even when the client left before the body started (then nothing iterated it)."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
        background=BackgroundTask(stream.aclose),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves through the one error table, on the partner and the ops listener alike."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    @app.exception_handler(ServingError)
    async def _on_domain(_request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI raises these for bodies it cannot read (e.g. invalid UTF-8) and for unknown routes.
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"no route {request.method} {request.url.path}; see /docs"))
        if exc.status_code == 405:
            return error_response(InvalidInput(f"method {request.method} is not allowed on {request.url.path}"))
        return error_response(InvalidInput(f"the body cannot be read: {exc.detail} (send UTF-8 JSON)"))

    @app.exception_handler(Exception)
    async def _on_bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(exc)


def health_routes(app: FastAPI, ready: ReadyCheck) -> None:
    """``/healthz`` (the process answers) and ``/readyz`` (200 only when it should get traffic)."""

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        state = ready()  # the state the gateway's watcher keeps: never waits on the Serve controller
        return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)
