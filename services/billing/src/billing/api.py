"""The billing HTTP API (FastAPI). Errors share one body shape: ``{"error": {"message", "type", "code", "param"}}``.

- ``GET /v1/invoices?partner=&period=&format=json|csv``: stored invoices; drafts for a period not closed yet
- ``GET /v1/invoices/{period}/{partner}?format=json|csv``: one closed invoice's export, byte for byte
- ``POST /v1/periods/{period}/close``: close a period (idempotent)
- ``GET /v1/periods/{period}/reconciliation``: counters vs ledger per partner and hour
- ``GET /metrics``, ``GET /healthz``

Every ``/v1`` route needs ``Authorization: Bearer <admin token>`` (``BILLING_ADMIN_TOKEN``): invoices name every
partner and their spend. On SIGTERM the service stops its scrape loop and scrapes every target one last time
(a gateway that stops gracefully keeps its ops listener up for that), then exits.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from billing.errors import ERRORS
from billing.invoices import CSV_HEADER
from billing.periods import Period
from billing.service import BillingService


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "billing_error", "code": code, "param": param}}
    return JSONResponse(body, status_code=status)


log = logging.getLogger("billing.api")


class AdminRequired(Exception):
    """A /v1 call without the admin token (401 when none was sent, 403 when it is wrong or the API is off)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _require_admin(token: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if token is None:
            raise AdminRequired("the billing API is disabled; set BILLING_ADMIN_TOKEN to enable it", 403)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AdminRequired("billing routes need 'Authorization: Bearer <admin token>'", 401)
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AdminRequired("this is not the admin token", 403)

    return check


def create_app(service: BillingService, scrape_in_background: bool = True) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker = None
        scraper = service.scraper if scrape_in_background else None
        if scraper is not None:
            worker = threading.Thread(target=scraper.run, args=(stop, service.settings.scrape_interval_s), daemon=True)
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None and scraper is not None:
                worker.join(timeout=service.settings.http_timeout_s * service.settings.retry_attempts)
                # The last word of every gateway still up (one that stops gracefully waits for this scrape).
                outcome = await run_in_threadpool(scraper.scrape_once)
                log.info("final scrape on shutdown: %s", outcome)

    app = FastAPI(title="billing", lifespan=lifespan)
    api = APIRouter(prefix="/v1", dependencies=[Depends(_require_admin(service.settings.admin_token))])

    @app.exception_handler(AdminRequired)
    async def _on_admin(_: Request, exc: AdminRequired) -> JSONResponse:
        return _error(exc.status, "admin_token_required" if exc.status == 401 else "permission_denied", str(exc))

    for kind in ERRORS:

        def handler(_: Request, exc: Exception, status: int = kind.http_status, code: str = kind.code) -> JSONResponse:
            return _error(status, code, str(exc))

        app.add_exception_handler(kind.error, handler)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **(await call(service.status))}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/invoices", response_model=None)
    async def invoices(
        partner: str | None = None, period: str | None = None, format: str = "json"
    ) -> dict[str, Any] | Response:
        found = await call(service.invoices, period, partner)
        if format == "csv":  # one header, then every invoice's rows
            rows = [line for item in found for line in item["csv"].splitlines()[1:]]
            return PlainTextResponse("\n".join([",".join(CSV_HEADER), *rows]) + "\n", media_type="text/csv")
        if format != "json":
            return _error(400, "invalid_format", "format must be json or csv", "format")
        return {"invoices": found}

    @api.get("/invoices/{period}/{partner}")
    async def invoice(period: str, partner: str, format: str = "json") -> Response:
        canonical = Period.parse(period).id
        stored = await call(service.store.invoices, canonical, partner)
        if not stored:
            return _error(404, "not_found", f"no closed invoice for partner {partner!r} in period {canonical}")
        if format == "csv":
            return Response(stored[0].csv, media_type="text/csv")
        return Response(stored[0].document, media_type="application/json")

    @api.post("/periods/{period}/close")
    async def close(period: str) -> dict[str, Any]:
        stored = await call(service.close_period, period)
        return {
            "period": Period.parse(period).id,
            "invoices": [{"partner": i.partner, "status": i.status} for i in stored],
        }

    @api.get("/periods/{period}/reconciliation")
    async def reconciliation(period: str) -> dict[str, Any]:
        report: dict[str, Any] = await call(service.reconciliation, period)
        return report

    app.include_router(api)
    return app
