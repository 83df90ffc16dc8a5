"""The measurement plan: which rows run, in which order (baselines interleaved with the rows they divide),
against which gateway, and the gateways' lifetime around it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from benchlib.common import EMBED_MODEL, NOOP_MODEL, Config, Measurement
from benchlib.cpu import VARIANT_DOORS, CpuRow, access_token, cpu_steps, echo_row, idle_cores, variant_rows
from benchlib.overhead import (
    LATENCY_PREFIX,
    METERED_PLAN,
    Overhead,
    forget_partner_in_redis,
    overhead_steps,
    start_overhead,
)
from benchlib.plain import plain_run
from benchlib.scaleout import measure_scaleout
from benchlib.stack import Stack, echo_payload, open_store, prepaid_key, start_echo_server, unlimited_key
from benchlib.sweep import sweep_steps
from benchlib.workers import grpc_run, http_run, raw_run

Step = Callable[[], Awaitable[Measurement]]


async def batch_totals(handle: Any) -> tuple[int, int]:
    snap = await handle.batch_stats.remote()
    return int(snap["batches"]), int(snap["items"])


async def with_batch_stats(handle: Any, run: Awaitable[Measurement]) -> Measurement:
    """The run, plus the mean number of items per replica batch over it (warm-up included)."""
    before = await batch_totals(handle)
    result = await run
    after = await batch_totals(handle)
    batches = after[0] - before[0]
    result.mean_batch = (after[1] - before[1]) / batches if batches else None
    return result


@dataclass(frozen=True)
class Targets:
    api_key: str
    stack: str  # the gateway as configured (micro-batching on)
    unbatched: str  # the same gateway code with micro-batching off (cap 1): one handle call per request
    echo: str


def build_plan(stack: Stack, t: Targets, cfg: Config) -> list[Step]:
    """Rows echo, raw, A, B, C, A0, B0: baselines interleaved with the rows they divide."""
    echo_label = "bare grpc.aio server, fixed response (same client)"

    def through(key: str, label: str, unit: str, target: str, model: str) -> Awaitable[Measurement]:
        return with_batch_stats(stack.handles[model], grpc_run(key, label, unit, target, t.api_key, model, cfg))

    return [
        lambda: grpc_run("echo#1", echo_label, "req/s", t.echo, t.api_key, EMBED_MODEL, cfg),
        lambda: raw_run("raw-1t#1", stack.model_dir, 1, cfg.raw_batch, cfg),
        lambda: through("A", "A: MiniLM through the whole stack", "texts/s", t.stack, EMBED_MODEL),
        lambda: through("B", "B: no-op through the whole stack", "req/s", t.stack, NOOP_MODEL),
        lambda: raw_run("raw-2t", stack.model_dir, 2, cfg.raw_batch, cfg),
        lambda: with_batch_stats(
            stack.plain[NOOP_MODEL],
            plain_run("C-i", "C(i): plain Serve, no-op, 1 call/request", stack.plain[NOOP_MODEL], cfg),
        ),
        lambda: with_batch_stats(
            stack.plain[EMBED_MODEL],
            plain_run("C-ii", "C(ii): plain Serve, MiniLM, 1 call/request", stack.plain[EMBED_MODEL], cfg),
        ),
        lambda: with_batch_stats(
            stack.plain[f"{NOOP_MODEL}-http"],
            http_run(
                "C-http-i", "C-http(i): plain Serve over HTTP (its proxy), no-op", stack.plain_http[NOOP_MODEL], cfg
            ),
        ),
        lambda: with_batch_stats(
            stack.plain[f"{EMBED_MODEL}-http"],
            http_run(
                "C-http-ii", "C-http(ii): plain Serve over HTTP (its proxy), MiniLM", stack.plain_http[EMBED_MODEL], cfg
            ),
        ),
        lambda: raw_run("raw-1t-b64", stack.model_dir, 1, 64, cfg),
        lambda: through("A0", "A0: MiniLM, stack with gateway micro-batch off", "texts/s", t.unbatched, EMBED_MODEL),
        lambda: through("B0", "B0: no-op, stack with gateway micro-batch off", "req/s", t.unbatched, NOOP_MODEL),
        lambda: grpc_run("echo#2", echo_label, "req/s", t.echo, t.api_key, EMBED_MODEL, cfg),
        lambda: raw_run("raw-1t#2", stack.model_dir, 1, cfg.raw_batch, cfg),
    ]


def build_overhead_plan(stack: Stack, overhead: Overhead, models: list[str], cfg: Config) -> list[Step]:
    """Rows G (and GM): auth+quota+metering on and off, same client, same concurrency."""

    def through(key: str, label: str, unit: str, target: str, model: str) -> Awaitable[Measurement]:
        run = grpc_run(key, label, unit, target, overhead.api_key, model, cfg)
        return with_batch_stats(stack.handles[model], run)

    def through_one(key: str, label: str, unit: str, target: str, model: str) -> Awaitable[Measurement]:
        run = grpc_run(key, label, unit, target, overhead.api_key, model, dataclasses.replace(cfg, concurrency=1))
        return with_batch_stats(stack.handles[model], run)

    steps = overhead_steps(overhead, models, through)
    if NOOP_MODEL in models:
        steps += overhead_steps(overhead, [NOOP_MODEL], through_one, prefix=LATENCY_PREFIX)
    return steps


def build_sweep_plan(stack: Stack, api_key: str, target: str, levels: list[int], cfg: Config) -> list[Step]:
    """Rows S: MiniLM then no-op through the whole stack at each concurrency level."""

    def run(key: str, label: str, unit: str, model: str, level_cfg: Config) -> Awaitable[Measurement]:
        return with_batch_stats(stack.handles[model], grpc_run(key, label, unit, target, api_key, model, level_cfg))

    return sweep_steps(run, [EMBED_MODEL, NOOP_MODEL], levels, cfg)


def sweep_settings(stack: Stack, levels: list[int]) -> Any:
    """The stack's settings with a per-partner queue that holds the sweep's largest level (one partner sends
    everything; the default queue of 64 would shed the rest as UNAVAILABLE), and its own data directory."""
    from serving.settings import Admission

    admission = Admission(max_queue_per_partner=max(levels), max_wait_s=stack.settings.admission.max_wait_s)
    return dataclasses.replace(stack.settings, data_dir=stack.tmp / "sweep", admission=admission)


def unbatched_settings(stack: Stack) -> Any:
    """The same settings with gateway micro-batching off, and its own data directory (ledger, journal)."""
    from serving.settings import Batching

    batching = Batching(max_batch_size=1, max_wait_ms=0)
    return dataclasses.replace(stack.settings, data_dir=stack.tmp / "unbatched", batching=batching)


@dataclass
class CpuOutcome:
    measured: list[Measurement]
    idle_cores: dict[str, float]  # variant (or "echo") → this process's CPU s per wall s with no load
    notes: list[str]


ECHO_KEY = "echo-server-ignores-keys"  # the SDK refuses an empty key; the echo server checks none


async def measure_cpu(stack: Stack, store: Any, echo: str, redis_url: str, cfg: Config) -> CpuOutcome:
    """Rows CPU (see ``benchlib.cpu``): the echo first and last; between them each variant's rows with only
    that variant's gateway alive in this process (started here, stopped after its rows)."""

    async def wrap(row: CpuRow, run: Awaitable[Measurement]) -> Measurement:
        return await (run if row.handle_model is None else with_batch_stats(stack.handles[row.handle_model], run))

    def steps(rows: list[CpuRow], api_key: str) -> list[Step]:
        return cpu_steps(rows, api_key, cfg, stack.tmp / "access.log", wrap)

    out = CpuOutcome([], {"echo": await idle_cores()}, [])
    out.measured += await run_plan(steps([echo_row(1, echo, cfg)], ECHO_KEY))
    for variant in VARIANT_DOORS:
        overhead = await start_overhead(
            stack, store, redis_url, only=(variant,), partner=f"bench-cpu-{variant}", data_prefix="cpu"
        )
        prepaid_id = None
        try:
            if variant not in overhead.targets:
                out.notes.append(f"CPU: ON (Redis quota) rows skipped: {overhead.note}")
                continue
            token = prepaid = None
            if variant != "off":  # the same partner's access token; a prepaid partner on the same limits
                token = access_token(store, overhead.partner_id)
                prepaid_id, prepaid = prepaid_key(store, f"bench-cpu-{variant}-prepaid", METERED_PLAN)
            out.idle_cores[variant] = await idle_cores()
            rows = variant_rows(variant, overhead, cfg, token, prepaid)
            out.measured += await run_plan(steps(rows, overhead.api_key))
        finally:
            await overhead.stop()
            if prepaid_id is not None and overhead.redis_url is not None:
                await forget_partner_in_redis(overhead.redis_url, prepaid_id)
    out.measured += await run_plan(steps([echo_row(2, echo, cfg)], ECHO_KEY))
    return out


async def run_plan(plan: list[Step]) -> list[Measurement]:
    results: list[Measurement] = []
    for step in plan:
        result = await step()
        cpu = "" if result.cpu_us is None else f"  [{result.cpu_us:.0f} µs CPU/request]"
        print(f"  {result.key:<17} {result.rate:9.1f} {result.unit:<8} {result.label}{cpu}", flush=True)
        results.append(result)
    return results


@dataclass(frozen=True)
class Selection:
    """What to run: the whole-stack rows, the G rows on which models (with Redis at which URL), the sweep, the
    CPU rows, the W rows (``serving gateway --workers 1`` and ``2`` as processes of their own)."""

    stack_rows: bool
    overhead_models: list[str]
    redis_url: str
    sweep_levels: list[int]  # empty: no sweep
    cpu_rows: bool = False
    workers_rows: bool = False


@dataclass
class Outcome:
    measured: list[Measurement]
    notes: list[str]  # setup notes
    idle_cores: dict[str, float]  # rows CPU: the bench process's CPU s per wall s with no load, per variant


async def measure_all(stack: Stack, cfg: Config, selection: Selection) -> Outcome:
    """Starts every gateway, runs the plan, stops them; then the W and the CPU rows, which start their own."""
    from serving.gateway.app import Gateway

    store = open_store(stack.tmp / "serving.db")
    gateways = [
        Gateway(stack.settings, stack.specs, stack.handles, store),
        Gateway(unbatched_settings(stack), stack.specs, stack.handles, store),
    ]
    if selection.sweep_levels:
        gateways.append(Gateway(sweep_settings(stack, selection.sweep_levels), stack.specs, stack.handles, store))
    echo: grpc.aio.Server | None = None
    echo_port = 0
    overhead: Overhead | None = None
    notes: list[str] = []

    async def stop_gateways() -> None:
        nonlocal overhead
        await asyncio.gather(*(gateway.stop() for gateway in gateways))
        gateways.clear()
        if overhead is not None:
            await overhead.stop()
            overhead = None

    try:
        plan: list[Step] = []
        for gateway in gateways if selection.stack_rows else gateways[2:]:
            await gateway.start()
        if selection.stack_rows or selection.cpu_rows:
            echo, echo_port = await start_echo_server(echo_payload())
        if selection.stack_rows:
            targets = Targets(
                api_key=unlimited_key(store, "bench"),
                stack=f"127.0.0.1:{gateways[0].grpc_port}",
                unbatched=f"127.0.0.1:{gateways[1].grpc_port}",
                echo=f"127.0.0.1:{echo_port}",
            )
            plan += build_plan(stack, targets, cfg)
        if selection.overhead_models:
            overhead = await start_overhead(stack, store, selection.redis_url)
            notes.append(overhead.note)
            print(overhead.note, flush=True)
            plan += build_overhead_plan(stack, overhead, selection.overhead_models, cfg)
        if selection.sweep_levels:
            target = f"127.0.0.1:{gateways[2].grpc_port}"
            plan += build_sweep_plan(stack, unlimited_key(store, "bench-sweep"), target, selection.sweep_levels, cfg)
        measured = await run_plan(plan)
        await stop_gateways()
        if selection.workers_rows:
            replica = functools.partial(with_batch_stats, stack.handles[NOOP_MODEL])
            scaled, scale_notes = await measure_scaleout(stack, store, selection.redis_url, cfg, run_plan, replica)
            measured += scaled
            notes += scale_notes
        if not selection.cpu_rows:
            return Outcome(measured, notes, {})
        cpu = await measure_cpu(stack, store, f"127.0.0.1:{echo_port}", selection.redis_url, cfg)
        return Outcome(measured + cpu.measured, notes + cpu.notes, cpu.idle_cores)
    finally:
        if echo is not None:
            await echo.stop(0)
        await stop_gateways()
        store.close()
