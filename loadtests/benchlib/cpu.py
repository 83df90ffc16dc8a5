"""Rows CPU: the gateway process's CPU time per request on the no-op model (issue 12: ≤ 300 µs with everything
ON and the Redis quota), next to the bare grpc.aio echo server's.

The gateways run in the bench process, so its ``time.process_time()`` (all its threads: front doors, core,
Ray's core-worker threads of the handle path, the ledger and access-log threads) is the gateway's CPU. A
``phased`` client subprocess warms up with ``cpu_warmup`` requests, then sends exactly ``cpu_requests`` at
the bench's concurrency while the parent snapshots CPU around them: µs/request = ΔCPU ÷ N. Work a request
defers past its response (settling the quota, flushing the ledger) leaves the window for the last requests
and enters it for the warm-up's last ones: in steady state the two cancel.

Everything is ON in the ON rows: the real ``Gateway`` (key lookup, MemoryQuota or RedisQuota on a metered
plan, fair queue, SQLite ledger, Prometheus metrics) with the access log configured as ``serving run`` does,
writing to a file. The OFF row is the G rows' stand-in gateway (gRPC only, access log off).

Each variant's rows run with only that variant's gateway alive in the process (an idle ``Gateway`` polls
Serve for readiness and replica counts: about 10 ms of CPU per second each here, several times that on a
busy machine), as in production, where a process holds one gateway. That background still counts: its rate
with no load (the variant's gateway up, idle) is measured before the variant's rows and printed beside them,
not subtracted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.common import NOOP_MODEL, Config, Measurement, Ratio, fmt, mean_of, measurement
from benchlib.overhead import Overhead
from benchlib.workers import phased_run

CPU_PREFIX = "cpu-"
ECHO = "cpu-echo"
TARGET_US = 300.0  # issue 12: gateway CPU per no-op request, everything ON with the Redis quota
DOOR_NAME = {"grpc": "gRPC", "http": "HTTP /v1/embed", "openai": "OpenAI /v1/embeddings"}
VARIANT_NAME = {"off": "OFF (stand-ins)", "on": "ON (memory quota)", "redis": "ON (Redis quota)"}
VARIANT_DOORS = {"off": ("grpc",), "on": ("grpc", "http", "openai"), "redis": ("grpc", "http", "openai")}


@dataclass(frozen=True)
class CpuRow:
    """One row: where its requests go and how."""

    key: str
    label: str
    variant: str  # echo, off, on, redis
    door: str
    target: str  # host:port for gRPC, base URL for HTTP
    concurrency: int
    access_log: bool  # configure the access log for this row (the ON gateways)
    handle_model: str | None  # the model whose replica batch stats to read (None: the echo server)
    credential: str | None = None  # an access token or a prepaid partner's key instead of the variant's API key


def echo_row(run: int, echo: str, cfg: Config) -> CpuRow:
    """The bare grpc.aio echo server; it runs first and last, and its mean divides."""
    return CpuRow(
        f"{ECHO}#{run}", "CPU: bare grpc.aio echo server, gRPC", "echo", "grpc", echo, cfg.concurrency, False, None
    )


def access_token(store: Any, partner_id: str) -> str:
    """An OAuth access token for the partner, as POST /oauth/token issues it: the default lifetime (900 s; gateways
    refuse longer ones), which outlasts one variant's rows."""
    from serving.identity.scopes import ALL_SCOPES
    from serving.identity.tokens import TokenIssuer
    from serving.settings import Settings

    client, secret = store.clients.create(partner_id, "bench", frozenset(ALL_SCOPES))
    defaults = Settings()
    issuer = TokenIssuer(
        store.client_owner, store.signing.signing_key, defaults.oauth_issuer, defaults.oauth_token_ttl_s
    )
    return str(issuer.issue(client.client_id, secret, None)["access_token"])


def variant_rows(
    variant: str, overhead: Overhead, cfg: Config, token: str | None = None, prepaid: str | None = None
) -> list[CpuRow]:
    """The variant's front doors (each ON gRPC door also with an access token, and with a prepaid partner's key,
    instead of the API key); ON-redis gRPC again at concurrency 1 (every request its own handle call)."""
    rows = []
    for door in VARIANT_DOORS[variant]:
        target = overhead.targets[variant] if door == "grpc" else overhead.http_targets[variant]
        label = f"CPU: no-op, gateway {VARIANT_NAME[variant]}, {DOOR_NAME[door]}"
        key = f"{CPU_PREFIX}{variant}-{door}"
        rows.append(CpuRow(key, label, variant, door, target, cfg.concurrency, variant != "off", NOOP_MODEL))
        if door == "grpc" and token is not None:
            tokened = f"{label}, OAuth access token"
            rows.append(
                CpuRow(f"{key}-token", tokened, variant, door, target, cfg.concurrency, True, NOOP_MODEL, token)
            )
        if door == "grpc" and prepaid is not None:  # issue 17: money held at admission, drawn at settlement
            held = f"{label}, prepaid plan"
            rows.append(
                CpuRow(f"{key}-prepaid", held, variant, door, target, cfg.concurrency, True, NOOP_MODEL, prepaid)
            )
    if variant == "redis":
        label = f"CPU: no-op, gateway {VARIANT_NAME[variant]}, gRPC, concurrency 1"
        key = f"{CPU_PREFIX}redis-grpc-c1"
        rows.append(CpuRow(key, label, variant, "grpc", overhead.targets[variant], 1, True, NOOP_MODEL))
    return rows


def variant_of(key: str) -> str:
    """``cpu-redis-grpc`` → ``redis``, ``cpu-echo#1`` → ``echo``."""
    return key.removeprefix(CPU_PREFIX).split("-")[0].split("#")[0]


@contextlib.contextmanager
def access_log_to(path: Path) -> Iterator[None]:
    """The access log on, as ``serving run`` configures it (a queue and a writer thread), into ``path``; then
    back to how the bench process has it (no handler: the core skips the lines)."""
    from serving.observability import access_log

    logger = logging.getLogger(access_log.ACCESS_LOGGER)
    with path.open("a") as stream:
        listener = access_log.configure(True, stream)
        try:
            yield
        finally:
            listener.stop()
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.propagate = True


def access_log_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


async def cpu_run(row: CpuRow, api_key: str, cfg: Config, access_log: Path) -> Measurement:
    """One row: a phased client subprocess, this process's CPU over its measured requests."""
    job = {
        "door": row.door,
        "target": row.target,
        "api_key": row.credential or api_key,
        "model": NOOP_MODEL,
        "concurrency": row.concurrency,
        "warmup": cfg.cpu_warmup,
        "requests": cfg.cpu_requests,
    }
    lines = access_log_lines(access_log)
    with access_log_to(access_log) if row.access_log else contextlib.nullcontext():
        phased = await phased_run(job)
    if row.access_log and access_log_lines(access_log) - lines < phased.load.completed:
        raise RuntimeError(f"{row.key}: the gateway wrote fewer access-log lines than it served requests")
    result = measurement(row.key, row.label, "req/s", phased.load)
    result.cpu_us = phased.cpu_s * 1e6 / max(1, phased.load.completed)
    result.cpu_cores = phased.cpu_s / phased.wall_s
    return result


async def idle_cores(seconds: float = 1.0) -> float:
    """This process's CPU seconds per wall second with no load (after a short pause for deferred work)."""
    await asyncio.sleep(0.5)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


Step = Callable[[], Awaitable[Measurement]]
Wrap = Callable[[CpuRow, Awaitable[Measurement]], Awaitable[Measurement]]


def cpu_steps(rows: list[CpuRow], api_key: str, cfg: Config, access_log: Path, wrap: Wrap) -> list[Step]:
    """A step per row; ``wrap`` adds what is read outside the CPU window (the replica's batch stats)."""

    def step(row: CpuRow) -> Step:
        return lambda: wrap(row, cpu_run(row, api_key, cfg, access_log))

    return [step(row) for row in rows]


# --- what the report derives from the CPU rows -------------------------------------------------------------


def cpu_means(results: dict[str, Measurement]) -> list[Measurement]:
    """``cpu-echo``: the mean of the echo's two runs, CPU included."""
    runs = [f"{ECHO}#1", f"{ECHO}#2"]
    if not all(run in results for run in runs):
        return []
    mean = mean_of(results, runs, ECHO, "CPU: bare grpc.aio echo server, gRPC (mean of 2 runs)")
    mean.cpu_us = sum(results[r].cpu_us or 0.0 for r in runs) / 2
    mean.cpu_cores = sum(results[r].cpu_cores or 0.0 for r in runs) / 2
    return [mean]


def cpu_keys(results: dict[str, Measurement]) -> list[str]:
    """The rows of the CPU table, in the order measured, the echo as its mean."""
    keys = [ECHO] if ECHO in results else []
    return keys + [k for k in results if k.startswith(CPU_PREFIX) and not k.startswith(ECHO)]


def cpu_table(results: dict[str, Measurement], idle: dict[str, float]) -> str:
    """The table "CPU per request (gateway process)"; "idle share" is the row's variant's CPU rate with no load
    ÷ the row's request rate (a part of µs/request)."""
    echo = results.get(ECHO)
    lines = [
        "CPU per request (gateway process)",
        "",
        "| row | µs/request | idle share µs | req/s | CPU cores busy | CPU ÷ echo | p50 ms | mean replica batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in cpu_keys(results):
        m = results[key]
        ratio = m.cpu_us / echo.cpu_us if echo and echo.cpu_us and m.cpu_us else None
        idle_rate = idle.get(variant_of(key))
        cells = [
            m.label.removeprefix("CPU: "),
            fmt(m.cpu_us, 0),
            fmt(idle_rate * 1e6 / m.rate if idle_rate is not None and m.rate else None, 0),
            f"{m.rate:.0f}",
            fmt(m.cpu_cores, 2),
            fmt(ratio, 2),
            fmt(m.p50_ms),
            fmt(m.mean_batch),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_ratios(results: dict[str, Measurement]) -> list[Ratio]:
    rows: list[Ratio] = []
    echo, redis = results.get(ECHO), results.get(f"{CPU_PREFIX}redis-grpc")
    if redis is None or redis.cpu_us is None:
        return rows
    beside = f"bare grpc.aio {echo.cpu_us:.0f} µs" if echo and echo.cpu_us else "no echo figure"
    label = f"CPU: gateway CPU per no-op request, everything ON with the Redis quota, gRPC ({beside})"
    rows.append(Ratio(label, redis.key, ECHO, redis.cpu_us, TARGET_US, op="≤", unit="µs"))
    for door in ("http", "openai"):
        other = results.get(f"{CPU_PREFIX}redis-{door}")
        if other is not None and other.cpu_us is not None:
            label = f"CPU: the same over {DOOR_NAME[door]} ({beside})"
            rows.append(Ratio(label, other.key, ECHO, other.cpu_us, None, op="≤", unit="µs"))
    if echo is not None and echo.cpu_us:
        label = "CPU: gateway ON (Redis quota) ÷ bare grpc.aio, CPU per request, gRPC"
        rows.append(Ratio(label, redis.key, ECHO, redis.cpu_us / echo.cpu_us, None, op="≤"))
    for variant in ("on", "redis"):  # issue 16: an access token costs no more CPU than an API key
        key_row, token_row = (
            results.get(f"{CPU_PREFIX}{variant}-grpc"),
            results.get(f"{CPU_PREFIX}{variant}-grpc-token"),
        )
        if key_row and token_row and key_row.cpu_us and token_row.cpu_us is not None:
            label = f"CPU: OAuth access token ÷ API key, CPU per request, {VARIANT_NAME[variant]}, gRPC"
            rows.append(Ratio(label, token_row.key, key_row.key, token_row.cpu_us / key_row.cpu_us, 1.0, op="≤"))
    for variant in ("on", "redis"):  # issue 17: what a prepaid plan's hold and draw add
        key_row, prepaid_row = (
            results.get(f"{CPU_PREFIX}{variant}-grpc"),
            results.get(f"{CPU_PREFIX}{variant}-grpc-prepaid"),
        )
        if key_row and prepaid_row and key_row.cpu_us and prepaid_row.cpu_us is not None:
            label = f"CPU: prepaid plan ÷ metered plan, CPU per request, {VARIANT_NAME[variant]}, gRPC"
            rows.append(Ratio(label, prepaid_row.key, key_row.key, prepaid_row.cpu_us / key_row.cpu_us, None, op="≤"))
    for key, what in (("off", "OFF (stand-ins)"), ("on", "ON (memory quota)")):
        base = results.get(f"{CPU_PREFIX}{key}-grpc")
        if base is not None and base.cpu_us is not None:
            label = f"CPU: ON (Redis quota) − {what}, CPU per request, gRPC"
            rows.append(Ratio(label, redis.key, base.key, redis.cpu_us - base.cpu_us, None, op="≤", unit="µs"))
    return rows


def cpu_notes(results: dict[str, Measurement], idle: dict[str, float]) -> list[str]:
    notes = []
    if idle:
        rates = ", ".join(f"{VARIANT_NAME.get(v, 'echo server only')} {1000 * r:.0f}" for v, r in idle.items())
        notes.append(
            f"CPU rows: the bench process's CPU with no load, ms per s: {rates}; the 'idle share' column is that "
            "rate ÷ the row's request rate (included in µs/request)"
        )
    a, b = results.get(f"{ECHO}#1"), results.get(f"{ECHO}#2")
    if a and b and a.cpu_us and b.cpu_us:
        drift = abs(a.cpu_us - b.cpu_us) / max(a.cpu_us, b.cpu_us)
        if drift > 0.15:
            notes.append(f"{a.key} and {b.key} CPU per request differ by {drift:.0%}: the CPU rows carry that noise")
    return notes


def cpu_json(results: dict[str, Measurement], idle: dict[str, float]) -> dict[str, Any]:
    echo = results.get(ECHO)
    rows = []
    for key in cpu_keys(results):
        m = results[key]
        vs_echo = m.cpu_us / echo.cpu_us if echo and echo.cpu_us and m.cpu_us else None
        rows.append(
            {"key": key, "label": m.label, "cpu_us": m.cpu_us, "rate": m.rate, "cpu_cores": m.cpu_cores}
            | {"vs_echo": vs_echo}
        )
    return {"idle_cores": idle, "rows": rows}
