"""Builds the gateway (core, both front doors, the ops listener) over model handles and runs it until told to stop.

Shutdown is graceful: readiness turns false, new calls get UNAVAILABLE, in-flight requests get
``shutdown_grace_s`` to finish, the ledger is flushed, and the ops listener waits for a last scrape of the final
counters before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from transformers import AutoConfig

from serving.commerce.credits import CreditStore
from serving.commerce.prepaid import Prepaid
from serving.commerce.pricebook import PriceBook
from serving.commerce.redis_wallet import RedisWallet
from serving.commerce.wallet import MemoryWallet, Wallet
from serving.domain import Caller, Task
from serving.gateway.catalog import Catalog
from serving.gateway.core import Core
from serving.gateway.grpc import Health, build_grpc_server
from serving.gateway.http import build_http_app
from serving.gateway.http_admin import admin_router
from serving.gateway.http_common import HttpConfig
from serving.gateway.http_oauth import OAuthEndpoints
from serving.gateway.http_ops import build_ops_app
from serving.gateway.router import ModelRoute, Router, replica_counts
from serving.idempotency.keys import IdempotencyKeys
from serving.idempotency.redis_store import RedisIdempotency
from serving.idempotency.store import IdempotencyStore, MemoryIdempotency
from serving.identity.tokens import TokenIssuer, TokenVerifier
from serving.metering.ledger import Ledger
from serving.metering.usage import spend_since, tokens_between, usage_by_day
from serving.models.aliases import AliasSpec
from serving.models.codec import TextCodec
from serving.models.deployment import models_state
from serving.models.registry import ModelSpec
from serving.models.sources import resolve_model_dir
from serving.observability.metrics import Metrics
from serving.observability.tracing import build_tracing
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.quota.admission import Admission
from serving.quota.limiter import QuotaBackend
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota
from serving.settings import Settings
from serving.storage.database import Database
from serving.storage.redis_batch import RedisBatch
from serving.webhooks.events import CreditSnapshot
from serving.webhooks.service import WebhookService
from serving.webhooks.store import Subscription, WebhookStore

log = logging.getLogger("serving.gateway")

_READY_POLL_S = 1.0  # how often the watcher asks the Serve controller
_WALLET_LEASE_MIN_S = 600.0


def build_routes(specs: list[ModelSpec], handles: dict[str, Any], cache_dir: Path) -> dict[str, ModelRoute]:
    routes: dict[str, ModelRoute] = {}
    for spec in specs:
        model_dir = resolve_model_dir(spec, cache_dir)
        dims = 0 if spec.task is Task.GENERATE else int(AutoConfig.from_pretrained(model_dir).hidden_size)
        routes[spec.id] = ModelRoute(spec=spec, codec=TextCodec(model_dir), handle=handles[spec.id], dimensions=dims)
    return routes


@dataclass
class _Readiness:
    """ "ready", "loading" (a model application is not RUNNING yet), "draining" (a graceful stop began) or
    "drained" (every request finished and was stored; the ops listener waits for billing's last scrape)."""

    app_names: list[str]
    ready: bool = False
    serving: frozenset[str] | None = None  # applications with a running replica; None: not known yet
    stopping: bool = False
    drained: bool = False
    unreachable_since: float | None = None  # the Serve controller has not answered since then

    def __call__(self) -> str:
        """The state as last refreshed: never waits on the controller (probes must answer during its outage)."""
        if self.drained:
            return "drained"
        if self.stopping:
            return "draining"
        return "ready" if self.ready else "loading"

    def refresh(self) -> None:
        """Asks the Serve controller (blocking; one caller, the gateway's watcher). When it fails, the last answer
        stands: while the head restarts under GCS fault tolerance the replicas keep serving and the gateway's
        handles keep their replica lists, and a gateway turning unready then would cut every partner off for an
        outage they would not otherwise see. (Asked while the controller is down, Serve waits for it to return.)
        Before the first answer the gateway is not ready."""
        try:
            self.ready, self.serving = models_state(self.app_names)
        except Exception:
            if self.unreachable_since is None:
                log.warning("the Serve controller did not answer; keeping the last model state", exc_info=True)
                self.unreachable_since = time.monotonic()
            return
        if self.unreachable_since is not None:
            log.warning("the Serve controller answers again after %.1f s", time.monotonic() - self.unreachable_since)
            self.unreachable_since = None


async def _in_daemon_thread(work: Callable[[], None]) -> None:
    """``work()`` on a daemon thread of its own. While the head is down ``serve.status()`` waits for the controller
    to return: on the default executor such a call would hold up the process's exit after a graceful stop (the
    executor joins its threads); a daemon thread is simply left behind."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():  # cancelled when the watcher stops
            done.set_result(None)

    def run() -> None:
        try:
            work()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="serve-status", daemon=True).start()
    await done


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves signals alone: uvicorn's own handlers would close every listener at SIGTERM,
    before the drain, and the ops listener must outlive the drain (the gateway's stop sequence decides)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _longest_request_s(settings: Settings) -> float:
    """How long a request can hold anything: its wait in the fair queue, its timeout, the shutdown grace."""
    return settings.admission.max_wait_s + settings.http_timeout_s + settings.shutdown_grace_s


def build_redis(settings: Settings) -> RedisBatch | None:
    """The one Redis client of a gateway whose replicas share state: quota and idempotency operations made in the
    same event-loop turn share its round trip."""
    return None if settings.redis_url is None else RedisBatch(settings.redis_url, timeout_s=settings.redis_timeout_s)


def build_idempotency(settings: Settings, redis: RedisBatch | None) -> IdempotencyStore:
    """In-process for one replica; Redis (shared, like the quota) when replicas share state."""
    ttl, cap, running = settings.idempotency_ttl_s, settings.idempotency_max_bytes, _longest_request_s(settings)
    if redis is None:
        return MemoryIdempotency(ttl, cap, running)
    return RedisIdempotency(redis, ttl_s=ttl, max_bytes=cap, running_ttl_s=running, timeout_s=settings.redis_timeout_s)


def build_prepaid(settings: Settings, store: PartnerStore, redis: RedisBatch | None, ledger: Database) -> Prepaid:
    """The price book and the credit grants; the wallet in-process for one replica, in Redis when replicas share;
    the ledger bounds what an empty wallet may count as unspent."""
    # A hold outlives its request by far: a settlement arriving after the lease would draw nothing, so the lease
    # covers the longest request and the settlement's retries through a Redis outage (a dead gateway's holds are
    # given back that much later).
    lease_s = max(_WALLET_LEASE_MIN_S, 2 * (settings.quota_lease_s or _longest_request_s(settings)))
    wallet: Wallet = MemoryWallet(lease_s) if redis is None else RedisWallet(redis, lease_s=lease_s)
    book, credits = PriceBook.load(settings.price_book), CreditStore(store.db)
    spend = functools.partial(spend_since, ledger)
    return Prepaid(book, credits, wallet, settings.auth_cache_ttl_s, ledger_spend=spend)


def build_quota(settings: Settings, metrics: Metrics, redis: RedisBatch | None) -> QuotaBackend:
    """In-process for one replica; Redis when replicas share quota."""
    lease_s = settings.quota_lease_s or _longest_request_s(settings)  # a lease outlives the longest request
    if redis is None:
        return MemoryQuota(lease_s=lease_s)
    return RedisQuota(
        redis,
        fail_open=settings.quota_failure_policy == "open",
        on_fail_open=metrics.quota_fail_open.inc,
        timeout_s=settings.redis_timeout_s,
        lease_s=lease_s,
    )


class Gateway:
    def __init__(
        self,
        settings: Settings,
        specs: list[ModelSpec],
        handles: dict[str, Any],
        store: PartnerStore,
        aliases: Sequence[AliasSpec] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``aliases``: the registry's aliases over ``specs``; ``clock``: Unix seconds, what sunsets are checked
        against (tests fix it)."""
        catalog = Catalog(specs, aliases, clock)  # checked before anything opens
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = build_tracing(
            settings.tracing_exporter, settings.otlp_endpoint, settings.trace_sample_ratio, "serving-gateway"
        )
        self.store = store
        self.router = Router(
            build_routes(specs, handles, settings.models_cache),
            settings.batching,
            self.metrics,
            self.tracing,
            grpc_transport=settings.ray_transport == "grpc",
            router_on_loop=settings.ray_router_on_loop,
        )
        self.redis = build_redis(settings)
        self.quota = build_quota(settings, self.metrics, self.redis)
        self.ledger = Ledger(
            Database(settings.ledger_db_url),
            settings.journal_dir,
            flush_interval_s=settings.ledger_flush_interval_s,
            observe_lag=self.metrics.ledger_write_lag.observe,
        )
        self.metrics.bind_ledger_backlog(lambda: self.ledger.backlog)
        # Access tokens: verified locally from the signing keys; issued by POST /oauth/token on the partner port.
        self.tokens = TokenVerifier(store.signing.public_keys, settings.oauth_issuer, settings.oauth_token_ttl_s)
        self.authenticator = Authenticator(store, settings.auth_cache_ttl_s, tokens=self.tokens)
        issuer = TokenIssuer(
            store.client_owner, store.signing.signing_key, settings.oauth_issuer, settings.oauth_token_ttl_s
        )
        self.oauth = OAuthEndpoints(issuer, store.signing.jwks)
        # Usage alerts: endpoints, events and deliveries in the partner database; usage read from the ledger's.
        usage = functools.partial(tokens_between, self.ledger.db)
        self.prepaid = build_prepaid(settings, store, self.redis, self.ledger.db)
        self.webhooks = WebhookService(
            WebhookStore(store.db), usage, settings.webhooks, settings.gateway_id, balances=self._credit_snapshot
        )
        self.idempotency = build_idempotency(settings, self.redis)
        self.keys = IdempotencyKeys(self.idempotency, self.ledger.seen, settings.idempotency_retry_ttl_s)
        self.admission = Admission(
            self.quota, specs, settings.admission, on_shed=self._count_shed, prepaid=self.prepaid
        )
        self.core = Core(
            self.authenticator,
            self.router,
            settings.limits,
            self.metrics,
            self.admission,
            self.ledger,
            functools.partial(usage_by_day, self.ledger.db),
            self.keys,
            self.tracing,
            catalog,
            credits=self.prepaid,
        )
        self.app_names = {spec.id: f"{settings.serve_app_name}-{spec.id}" for spec in specs}
        self.readiness = _Readiness(list(self.app_names.values()))
        self._replica_task: asyncio.Task[None] | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.ops_port = 0
        self._grpc_server: Any = None  # a grpc.aio.Server; only the front doors import grpc
        self._health: Health | None = None
        self._http: tuple[uvicorn.Server, asyncio.Task[None], int] | None = None
        self._ops: tuple[uvicorn.Server, asyncio.Task[None], int] | None = None
        self._scrapes = 0  # /metrics reads on the ops listener
        self._drain_task: asyncio.Task[None] | None = None
        self._drained = False
        self._closed = False
        self._final_scrape = asyncio.Event()  # a scrape after the drain read the final counters

    async def _credit_snapshot(self, sub: Subscription) -> CreditSnapshot | None:
        """What balance alerts compare: the partner's active grants, used and granted."""
        caller = Caller(sub.partner_id, "", Plan(sub.plan, prepaid=sub.prepaid))
        found = await self.prepaid.used_of_grants(caller)
        if found is None:
            return None
        ids, used, granted = found
        return CreditSnapshot(tuple(ids), used, granted, self.prepaid.book.currency)

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
                self.metrics.record_generation_load(model, stats)

    async def _watch_readiness(self) -> None:
        """Asks the Serve controller every second and keeps readiness (what ``/readyz`` reads), gRPC health and
        the router's fail-fast marks in step with its answer."""
        assert self._health is not None
        while not self.readiness.stopping:
            await _in_daemon_thread(self.readiness.refresh)
            state = self.readiness()
            if self.readiness.serving is not None:  # calls to a model without replicas fail fast, not wait
                for model, app in self.app_names.items():
                    self.router.set_serving(model, app in self.readiness.serving)
            if state not in ("draining", "drained"):
                await self._health.models_ready(state == "ready")
            await asyncio.sleep(_READY_POLL_S)

    def _scraped(self) -> None:
        self._scrapes += 1
        if self._drained:
            self._final_scrape.set()

    async def _serve_http(
        self, app: Any, host: str, port: int, reuse_port: bool = False, tls: bool = False
    ) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
        # Bind the socket ourselves so the port (possibly 0) is known before serving starts.
        sock = socket.create_server((host, port), reuse_port=reuse_port)
        s = self.settings
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=int(max(1, s.shutdown_grace_s)),
            lifespan="off",
            access_log=False,
            ssl_certfile=s.tls_cert_file if tls else None,
            ssl_keyfile=s.tls_key_file if tls else None,
        )
        server = _Listener(config)
        # The socket already listens, so connections queue until uvicorn accepts them.
        task = asyncio.create_task(server.serve(sockets=[sock]))
        return server, task, int(sock.getsockname()[1])

    async def start(self, reuse_port: bool = False) -> None:
        """``reuse_port``: this is one of several worker processes sharing the partner ports (SO_REUSEPORT, see
        ``gateway/workers.py``). The ops listener is never shared: each worker's /metrics is scraped on its own."""
        s = self.settings
        self._replica_task = asyncio.create_task(self.poll_replicas())
        self.webhooks.start()  # threshold evaluation and delivery loops (settings.webhooks)
        grpc_server, self.grpc_port, self._health = await build_grpc_server(
            self.core, s.grpc_host, s.grpc_port, s.limits.max_request_bytes, s.http_timeout_s, reuse_port, s.tls_pem
        )
        await grpc_server.start()
        self._grpc_server = grpc_server
        self._ready_task = asyncio.create_task(self._watch_readiness())
        partner_app = build_http_app(
            self.core,
            HttpConfig(s.limits.max_request_bytes, s.http_timeout_s),
            self.readiness,
            self.oauth,
            self.webhooks,
        )
        tls = s.tls_cert_file is not None
        self._http = await self._serve_http(partner_app, s.http_host, s.http_port, reuse_port, tls)
        self.http_port = self._http[2]
        admin = admin_router(self.store, self.ledger.db, s.admin_token, self.metrics)
        ops_app = build_ops_app(self.metrics, self.readiness, admin, on_scrape=self._scraped, jwks=self.oauth.jwks)
        self._ops = await self._serve_http(ops_app, s.ops_host, s.ops_port)
        self.ops_port = self._ops[2]

    async def drain(self) -> None:
        """The first half of a graceful stop: readiness turns false on both doors, new inference calls get
        UNAVAILABLE, calls in flight get ``shutdown_grace_s`` to finish, then the partner listeners close and the
        ledger stores every record. The ops listener stays up (billing reads the final counters). Idempotent."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        self.readiness.stopping = True
        self.core.start_draining()
        for task in (self._replica_task, self._ready_task):
            if task is not None:
                task.cancel()
        webhooks_stopped = asyncio.ensure_future(self.webhooks.stop())  # no new claims; attempts in flight finish
        if self._health is not None:
            await self._health.draining()
        grace = self.settings.shutdown_grace_s
        started = time.monotonic()
        if not await self.core.wait_idle(grace):
            log.warning("calls still in flight after the %.0f s grace period", grace)
        remaining = max(0.0, grace - (time.monotonic() - started))
        closing: list[Any] = [t for t in (self._replica_task, self._ready_task) if t is not None]
        closing.append(webhooks_stopped)
        if self._grpc_server is not None:
            closing.append(self._grpc_server.stop(remaining))
        if self._http is not None:
            self._http[0].config.timeout_graceful_shutdown = max(1, int(remaining))  # the rest of the one grace
            self._http[0].should_exit = True
            closing.append(self._http[1])
        await asyncio.gather(*closing, return_exceptions=True)
        # Calls cut off with their connections finish (and are metered) before the ledger closes.
        await self.core.wait_idle(1.0)
        await self.core.drain()
        # Every request has finished: flush the ledger before the process may exit.
        await asyncio.to_thread(self.ledger.close)
        self.metrics.drained_at.set(time.time())
        self._drained = self.readiness.drained = True

    async def close(self, final_scrape_wait_s: float | None = None) -> None:
        """The second half: waits (bounded) for one more scrape of the final counters when this gateway has been
        scraped before, then closes the ops listener and the stores."""
        if self._closed:
            return
        self._closed = True
        wait_s = self.settings.final_scrape_wait_s if final_scrape_wait_s is None else final_scrape_wait_s
        if self._scrapes and wait_s > 0:
            try:
                async with asyncio.timeout(wait_s):
                    await self._final_scrape.wait()
            except TimeoutError:
                log.warning("no /metrics scrape within %.0f s after the drain; the last counters may be lost", wait_s)
        if self._ops is not None:
            self._ops[0].should_exit = True
            await asyncio.gather(self._ops[1], return_exceptions=True)
        await self.prepaid.close()  # floors being raised read the ledger
        self.ledger.db.close()
        self.authenticator.close()
        await self.router.close()
        await self.quota.close()
        await self.prepaid.wallet.close()
        self.keys.close()
        await self.idempotency.close()
        if self.redis is not None:
            await self.redis.close()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes spans still queued for export

    async def stop(self, final_scrape_wait_s: float | None = None) -> None:
        """A whole graceful stop: ``drain()`` then ``close()``."""
        await self.drain()
        await self.close(final_scrape_wait_s)
