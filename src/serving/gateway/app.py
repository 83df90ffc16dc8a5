"""Builds the gateway (core, both front doors) over model handles and runs it until told to stop.

Shutdown is graceful: both servers stop accepting, in-flight requests get ``shutdown_grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from transformers import AutoConfig

from serving.domain import Task
from serving.gateway.core import Core
from serving.gateway.grpc import build_grpc_server
from serving.gateway.http import build_http_app
from serving.gateway.http_admin import admin_router
from serving.gateway.http_common import HttpConfig
from serving.gateway.router import ModelRoute, Router, replica_counts
from serving.metering.ledger import Ledger
from serving.metering.usage import usage_by_day
from serving.models.codec import TextCodec
from serving.models.deployment import models_ready
from serving.models.registry import ModelSpec
from serving.models.sources import resolve_model_dir
from serving.observability.metrics import Metrics
from serving.observability.tracing import build_tracing
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.quota.admission import Admission
from serving.quota.limiter import QuotaBackend
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota
from serving.settings import Settings
from serving.storage.database import Database

log = logging.getLogger("serving.gateway")

_READY_CACHE_S = 2.0


def build_routes(specs: list[ModelSpec], handles: dict[str, Any], cache_dir: Path) -> dict[str, ModelRoute]:
    routes: dict[str, ModelRoute] = {}
    for spec in specs:
        model_dir = resolve_model_dir(spec, cache_dir)
        dims = 0 if spec.task is Task.GENERATE else int(AutoConfig.from_pretrained(model_dir).hidden_size)
        routes[spec.id] = ModelRoute(spec=spec, codec=TextCodec(model_dir), handle=handles[spec.id], dimensions=dims)
    return routes


@dataclass
class _Readiness:
    app_names: list[str]
    checked_at: float = -1e9
    ready: bool = False
    stopping: bool = False

    def __call__(self) -> bool:
        if self.stopping:
            return False
        now = time.monotonic()
        if now - self.checked_at > _READY_CACHE_S:
            try:
                self.ready = models_ready(self.app_names)
            except Exception:  # the controller is unreachable: not ready
                log.warning("readiness check failed", exc_info=True)
                self.ready = False
            self.checked_at = now
        return self.ready


def build_quota(settings: Settings, metrics: Metrics) -> QuotaBackend:
    """In-process for one replica; Redis when replicas share quota."""
    if settings.redis_url is None:
        return MemoryQuota()
    return RedisQuota(
        settings.redis_url,
        fail_open=settings.quota_failure_policy == "open",
        on_fail_open=metrics.quota_fail_open.inc,
        timeout_s=settings.redis_timeout_s,
    )


class Gateway:
    def __init__(
        self, settings: Settings, specs: list[ModelSpec], handles: dict[str, Any], store: PartnerStore
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = build_tracing(
            settings.tracing_exporter, settings.otlp_endpoint, settings.trace_sample_ratio, "serving-gateway"
        )
        self.store = store
        self.router = Router(
            build_routes(specs, handles, settings.models_cache), settings.batching, self.metrics, self.tracing
        )
        self.quota = build_quota(settings, self.metrics)
        self.ledger = Ledger(
            Database(settings.ledger_db_url),
            settings.journal_dir,
            flush_interval_s=settings.ledger_flush_interval_s,
            observe_lag=self.metrics.ledger_write_lag.observe,
        )
        self.metrics.bind_ledger_backlog(lambda: self.ledger.backlog)
        self.core = Core(
            Authenticator(store, settings.auth_cache_ttl_s),
            self.router,
            settings.limits,
            self.metrics,
            Admission(self.quota, specs, settings.admission, on_shed=self._count_shed),
            self.ledger,
            functools.partial(usage_by_day, self.ledger.db),
            self.tracing,
        )
        self.app_names = {spec.id: f"{settings.serve_app_name}-{spec.id}" for spec in specs}
        self.readiness = _Readiness(list(self.app_names.values()))
        self._replica_task: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._grpc_server: Any = None  # a grpc.aio.Server; only the front doors import grpc
        self._http_server: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None

    def _count_shed(self, model: str, reason: str) -> None:
        self.metrics.shed.labels(model, reason).inc()

    async def poll_replicas(self) -> None:
        """Exports model replica counts by state (a Serve controller call) and the generation replicas' running
        and waiting sequences, every ``replica_poll_interval_s``."""
        while True:
            try:
                self.metrics.set_replicas(await asyncio.to_thread(replica_counts, self.app_names))
                await self._poll_generation_load()
            except Exception:  # the controller or a replica is unreachable: keep the last values, try again later
                log.warning("reading model replica state failed", exc_info=True)
            await asyncio.sleep(self.settings.replica_poll_interval_s)

    async def _poll_generation_load(self) -> None:
        # One replica answers each call: exact with one replica per model, a sample of one replica with several.
        for model, route in self.router.routes.items():
            if route.spec.task is Task.GENERATE:
                async with asyncio.timeout(self.settings.replica_poll_interval_s):  # a hung replica skips a round
                    stats = await route.batch_stats()
                self.metrics.running_sequences.labels(model).set(stats["running"])
                self.metrics.waiting_sequences.labels(model).set(stats["waiting"])

    async def start(self) -> None:
        s = self.settings
        self._replica_task = asyncio.create_task(self.poll_replicas())
        grpc_server, self.grpc_port = await build_grpc_server(
            self.core, s.grpc_host, s.grpc_port, s.limits.max_request_bytes
        )
        await grpc_server.start()
        self._grpc_server = grpc_server
        app = build_http_app(
            self.core,
            self.metrics,
            HttpConfig(s.limits.max_request_bytes, s.http_timeout_s),
            self.readiness,
            admin_router(self.store, self.ledger.db, s.admin_token),
        )
        # Bind the socket ourselves so the port (possibly 0) is known before serving starts.
        sock = socket.create_server((s.http_host, s.http_port), reuse_port=False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=int(max(1, s.shutdown_grace_s)),
            lifespan="off",
            access_log=False,
        )
        self._http_server = uvicorn.Server(config)
        # The socket already listens, so connections queue until uvicorn accepts them.
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]))

    async def stop(self) -> None:
        """Stop accepting; let in-flight requests finish within the grace period."""
        self.readiness.stopping = True
        if self._replica_task is not None:
            self._replica_task.cancel()
        grace = self.settings.shutdown_grace_s
        tasks: list[Any] = [self._replica_task] if self._replica_task is not None else []
        if self._grpc_server is not None:
            tasks.append(self._grpc_server.stop(grace))
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            tasks.append(self._http_task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.core.drain()
        # Every request has finished: flush the ledger before the process may exit.
        await asyncio.to_thread(self.ledger.close)
        self.ledger.db.close()
        await self.quota.close()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes spans still queued for export
