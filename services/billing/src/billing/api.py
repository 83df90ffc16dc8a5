"""The billing HTTP API (FastAPI). Errors share one body shape: ``{"error": {"message", "type", "code", "param"}}``.

- ``GET /v1/invoices?partner=&period=&format=json|csv``: stored invoices; drafts for a period not closed yet
- ``GET /v1/invoices/{period}/{partner}?format=json|csv``: one closed invoice's export, byte for byte
- ``POST /v1/periods/{period}/close``: close a period (idempotent)
- ``GET /v1/periods/{period}/reconciliation``: counters vs ledger per partner and hour
- ``GET /metrics``, ``GET /healthz``
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from billing.errors import ERRORS
from billing.invoices import CSV_HEADER
from billing.periods import Period
from billing.service import BillingService


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "billing_error", "code": code, "param": param}}
    return JSONResponse(body, status_code=status)


def create_app(service: BillingService, scrape_in_background: bool = True) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker = None
        if service.scraper is not None and scrape_in_background:
            worker = threading.Thread(
                target=service.scraper.run, args=(stop, service.settings.scrape_interval_s), daemon=True
            )
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                worker.join(timeout=service.settings.http_timeout_s * service.settings.retry_attempts)

    app = FastAPI(title="billing", lifespan=lifespan)

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

    @app.get("/v1/invoices", response_model=None)
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

    @app.get("/v1/invoices/{period}/{partner}")
    async def invoice(period: str, partner: str, format: str = "json") -> Response:
        canonical = Period.parse(period).id
        stored = await call(service.store.invoices, canonical, partner)
        if not stored:
            return _error(404, "not_found", f"no closed invoice for partner {partner!r} in period {canonical}")
        if format == "csv":
            return Response(stored[0].csv, media_type="text/csv")
        return Response(stored[0].document, media_type="application/json")

    @app.post("/v1/periods/{period}/close")
    async def close(period: str) -> dict[str, Any]:
        stored = await call(service.close_period, period)
        return {
            "period": Period.parse(period).id,
            "invoices": [{"partner": i.partner, "status": i.status} for i in stored],
        }

    @app.get("/v1/periods/{period}/reconciliation")
    async def reconciliation(period: str) -> dict[str, Any]:
        report: dict[str, Any] = await call(service.reconciliation, period)
        return report

    return app
