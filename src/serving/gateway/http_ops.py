"""The ops listener (``SERVING_OPS_HOST``/``SERVING_OPS_PORT``, 127.0.0.1 by default): ``/metrics``, the admin
API ``/admin/v1``, ``/healthz``, ``/readyz`` and the token signing keys (``/.well-known/jwks.json``). It carries
every partner's id and usage, so it never shares the partner port; expose it only to Prometheus, billing and
operators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from serving.gateway.http_common import ReadyCheck, health_routes, install_error_handlers
from serving.gateway.http_oauth import jwks_route
from serving.observability.metrics import Metrics


def build_ops_app(
    metrics: Metrics,
    ready: ReadyCheck,
    admin: APIRouter,
    on_scrape: Callable[[], None] = lambda: None,
    jwks: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """``on_scrape`` runs before each /metrics exposition is read (a graceful stop waits for a last one)."""
    app = FastAPI(title="Partner model API: ops", version="1.0.0", description="Metrics, admin API, health.")
    install_error_handlers(app)
    health_routes(app, ready)
    if jwks is not None:
        jwks_route(app, jwks)

    @app.get("/metrics", tags=["ops"])
    async def prometheus() -> Response:
        on_scrape()
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    app.include_router(admin)
    return app
