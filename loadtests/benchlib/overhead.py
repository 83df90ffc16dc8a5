"""Rows G: what auth + quota + metering cost the gateway (the partners' issue: throughput ON ÷ OFF ≥ 0.9,
added p50 latency ≤ 1 ms), measured side by side over gRPC with the same load generator and concurrency.

- ON is ``serving.gateway.app.Gateway`` itself: the Authenticator over the PartnerStore, MemoryQuota in
  process, Admission with its fair queues, the Ledger writing to SQLite through its journal. The partner is
  on a plan with generous but non-zero limits, so every quota check really runs. ON-redis is the same
  Gateway with ``redis_url`` set (RedisQuota: one Lua script per reserve and per settle).
- OFF is the same gRPC front door (``build_grpc_server``) and the same Router over the same handles, around
  a ``Core`` built here with the stand-ins below: the benchmark's off switch, not production code.

ON also runs the Gateway's (idle) HTTP server; OFF serves gRPC only. Runs are interleaved in a mirrored
order (OFF, ON, ON-redis, ON-redis, ON, OFF) and each variant is reported as the mean of its two runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchlib.common import EMBED_MODEL, NOOP_MODEL, Measurement, Ratio, mean_of
from benchlib.stack import Stack, partner_key
from serving.domain import Caller
from serving.metering.record import UsageRecord
from serving.plans import Plan
from serving.quota.limiter import Reservation

# Limits nobody reaches in a benchmark, but non-zero: zero would skip the checks.
METERED_PLAN = Plan(
    name="bench-metered",
    requests_per_minute=10_000_000,
    tokens_per_minute=10_000_000_000,
    max_concurrent=0,
    monthly_tokens=10**15,
)
NEVER_BLOCKS = 2**31  # a FairQueue capacity no load reaches: acquire() always takes its fast path
PREFIX = {NOOP_MODEL: "G", EMBED_MODEL: "GM"}
# The per-request cost shows at concurrency 1: at 32 the gateway is saturated and p50 ≈ 32 ÷ throughput.
LATENCY_PREFIX = "G1"
UNIT = {NOOP_MODEL: "req/s", EMBED_MODEL: "texts/s"}
NAME = {NOOP_MODEL: "no-op", EMBED_MODEL: "MiniLM"}
VARIANTS = {
    "off": "auth+quota+metering OFF (stand-ins)",
    "on": "auth+quota+metering ON (MemoryQuota, SQLite ledger)",
    "redis": "auth+quota+metering ON with RedisQuota",
}


# --- the off switch ----------------------------------------------------------------------------------------


class FixedAuthenticator:
    """Off: every request is the same caller; the key is neither parsed nor looked up."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    async def authenticate(self, _api_key: str | None) -> Caller:
        return self.caller


class NoQuota:
    """Off: a quota backend that counts nothing and never refuses."""

    async def reserve(self, caller: Caller, reservation_id: str, tokens: int) -> Reservation:
        return Reservation(caller.partner_id, reservation_id, tokens, "", None)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        pass

    async def close(self) -> None:
        pass


class DropLedger:
    """Off: a usage sink that drops every record (no journal, no database)."""

    def record(self, record: UsageRecord) -> None:
        pass

    def seen(self, partner_id: str, request_id: str) -> bool:
        return False


class OffGateway:
    """The gRPC front door and Router of the real gateway around a Core with the stand-ins above."""

    def __init__(self, settings: Any, specs: list[Any], handles: dict[str, Any]) -> None:
        from serving.gateway.app import build_routes
        from serving.gateway.core import Core
        from serving.gateway.router import Router
        from serving.idempotency.keys import IdempotencyKeys
        from serving.idempotency.store import MemoryIdempotency
        from serving.models.registry import ModelAdmission
        from serving.observability.metrics import Metrics
        from serving.quota.admission import Admission

        self.settings = settings
        open_specs = [dataclasses.replace(s, admission=ModelAdmission(max_concurrency=NEVER_BLOCKS)) for s in specs]
        # The same Ray hop as the real gateway (transport, router on this loop).
        self.router = Router(
            build_routes(specs, handles, settings.models_cache),
            settings.batching,
            grpc_transport=settings.ray_transport == "grpc",
            router_on_loop=settings.ray_router_on_loop,
        )
        self.core = Core(
            authenticator=FixedAuthenticator(Caller("p_bench_off", "off", Plan(name="bench-off"))),  # type: ignore[arg-type]
            router=self.router,
            limits=settings.limits,
            metrics=Metrics(),
            admission=Admission(NoQuota(), open_specs, settings.admission),
            ledger=DropLedger(),
            usage=lambda _partner, _start, _end: [],
            keys=IdempotencyKeys(MemoryIdempotency(60.0, 1 << 20, 60.0), lambda _partner, _key: False),
        )
        self.grpc_port = 0
        self._server: Any = None

    async def start(self) -> None:
        from serving.gateway.grpc import build_grpc_server

        s = self.settings
        server, self.grpc_port, _health = await build_grpc_server(
            self.core, s.grpc_host, s.grpc_port, s.limits.max_request_bytes, s.http_timeout_s
        )
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_s)
        await self.router.close()


# --- setting up ON and OFF ---------------------------------------------------------------------------------


async def redis_reachable(url: str) -> str | None:
    """None when Redis answers PING at ``url``; otherwise why not."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        await client.ping()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()


async def forget_partner_in_redis(url: str, partner_id: str) -> None:
    """Deletes the benchmark partner's quota, idempotency and wallet keys (the month counter would live 40 days,
    a wallet for ever)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        for pattern in (f"quota:{{{partner_id}}}:*", f"idem:{{{partner_id}}}:*", f"wallet:{{{partner_id}}}:*"):
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class Overhead:
    """The G gateways, started; ``targets`` maps a variant to its gRPC address, ``http_targets`` an ON variant
    to its HTTP base URL (OFF serves gRPC only)."""

    api_key: str
    partner_id: str
    redis_url: str | None
    targets: dict[str, str]
    http_targets: dict[str, str]
    gateways: list[Any]
    note: str

    async def stop(self) -> None:
        await asyncio.gather(*(gateway.stop() for gateway in self.gateways))
        if self.redis_url is not None:
            await forget_partner_in_redis(self.redis_url, self.partner_id)


async def start_overhead(
    stack: Stack,
    store: Any,
    redis_url: str,
    only: tuple[str, ...] = ("off", "on", "redis"),
    partner: str = "bench-metered",
    data_prefix: str = "g",
) -> Overhead:
    """The variants in ``only`` (ON-redis when Redis answers at ``redis_url``), started, with a new partner
    (named ``partner``: names are unique in the store) on the metered plan; data under ``<data_prefix>-*``."""
    from serving.gateway.app import Gateway

    partner_id, api_key = partner_key(store, partner, METERED_PLAN)
    settings = stack.settings
    variants: dict[str, Any] = {}
    if "off" in only:
        variants["off"] = OffGateway(settings, stack.specs, stack.handles)
    if "on" in only:
        on_settings = dataclasses.replace(settings, data_dir=stack.tmp / f"{data_prefix}-on")
        variants["on"] = Gateway(on_settings, stack.specs, stack.handles, store)
    why_not = await redis_reachable(redis_url) if redis_url else "no --redis-url"
    if "redis" not in only:
        note = "G: ON-redis not asked for"
    elif why_not is None:
        redis_settings = dataclasses.replace(settings, data_dir=stack.tmp / f"{data_prefix}-redis", redis_url=redis_url)
        variants["redis"] = Gateway(redis_settings, stack.specs, stack.handles, store)
        note = f"G: ON-redis uses RedisQuota at {redis_url}"
    else:
        note = f"G: ON-redis skipped, Redis at {redis_url or '-'} unreachable ({why_not})"
    started: list[Any] = []
    try:
        for gateway in variants.values():
            await gateway.start()
            started.append(gateway)
    except BaseException:
        await asyncio.gather(*(gateway.stop() for gateway in started), return_exceptions=True)
        raise
    targets = {name: f"127.0.0.1:{gateway.grpc_port}" for name, gateway in variants.items()}
    http = {name: f"http://127.0.0.1:{g.http_port}" for name, g in variants.items() if getattr(g, "http_port", 0)}
    return Overhead(api_key, partner_id, redis_url if "redis" in variants else None, targets, http, started, note)


Step = Callable[[], Awaitable[Measurement]]
Through = Callable[[str, str, str, str, str], Awaitable[Measurement]]


def overhead_steps(overhead: Overhead, models: list[str], through: Through, prefix: str | None = None) -> list[Step]:
    """Per model, the variants in a mirrored order (OFF, ON, ON-redis, ON-redis, ON, OFF): each variant's
    two runs sit around the same midpoint, so a steady drift moves their means alike."""
    variants = [v for v in ("off", "on", "redis") if v in overhead.targets]
    order = [(v, 1) for v in variants] + [(v, 2) for v in reversed(variants)]
    steps: list[Step] = []
    for model in models:
        for variant, run in order:
            key = f"{prefix or PREFIX[model]}-{variant}#{run}"
            label = f"{prefix or PREFIX[model]}: {NAME[model]}, gateway {VARIANTS[variant]}"
            target = overhead.targets[variant]

            def step(key: str = key, label: str = label, target: str = target, model: str = model) -> Any:
                return through(key, label, UNIT[model], target, model)

            steps.append(step)
    return steps


# --- what the report derives from the G rows ---------------------------------------------------------------


def overhead_means(results: dict[str, Measurement]) -> list[Measurement]:
    """``G-off``, ``G-on``, ... : each the mean of its two runs (rate and p50), for the variants measured."""
    means = []
    for model, prefix in [*PREFIX.items(), (NOOP_MODEL, LATENCY_PREFIX)]:
        for variant in VARIANTS:
            runs = [f"{prefix}-{variant}#{n}" for n in (1, 2)]
            if all(run in results for run in runs):
                label = f"{prefix}: {NAME[model]}, {VARIANTS[variant]} (mean of 2 runs)"
                means.append(mean_of(results, runs, f"{prefix}-{variant}", label))
    return means


def overhead_ratios(results: dict[str, Measurement]) -> list[Ratio]:
    """Throughput ON ÷ OFF and p50(ON) − p50(OFF); the partners' targets apply to the no-op rows, where the
    gateway is all there is to measure (on MiniLM the model's time hides it: shown without a target)."""
    rows = []
    off1 = results.get(f"{LATENCY_PREFIX}-off")
    for variant, what in (("on", "ON"), ("redis", "ON with RedisQuota")):
        on1 = results.get(f"{LATENCY_PREFIX}-{variant}")
        if off1 is not None and on1 is not None:
            label = f"{LATENCY_PREFIX}: added p50 latency at concurrency 1, {what} − OFF (no-op)"
            rows.append(Ratio(label, on1.key, off1.key, on1.p50_ms - off1.p50_ms, 1.0, op="≤", unit="ms"))
    for model, prefix in PREFIX.items():
        off = results.get(f"{prefix}-off")
        for variant, what in (("on", "ON"), ("redis", "ON with RedisQuota")):
            on = results.get(f"{prefix}-{variant}")
            if off is None or on is None:
                continue
            gateway = model == NOOP_MODEL
            rows.append(
                Ratio(
                    f"{prefix}: gateway throughput, auth+quota+metering {what} ÷ OFF ({NAME[model]})",
                    on.key,
                    off.key,
                    on.rate / off.rate,
                    0.9 if gateway else None,
                )
            )
            rows.append(
                Ratio(
                    f"{prefix}: added p50 latency, {what} − OFF ({NAME[model]})",
                    on.key,
                    off.key,
                    on.p50_ms - off.p50_ms,
                    None,  # saturated at this concurrency: the latency target is judged on the G1 rows
                    op="≤",
                    unit="ms",
                )
            )
    return rows


def overhead_notes(results: dict[str, Measurement]) -> list[str]:
    notes = []
    for prefix in [*PREFIX.values(), LATENCY_PREFIX]:
        for variant in VARIANTS:
            a, b = f"{prefix}-{variant}#1", f"{prefix}-{variant}#2"
            if a in results and b in results:
                drift = abs(results[a].rate - results[b].rate) / max(results[a].rate, results[b].rate)
                if drift > 0.15:
                    notes.append(f"{a} and {b} differ by {drift:.0%}: the G ratios carry that much noise")
    return notes
