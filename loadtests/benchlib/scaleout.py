"""Rows W: the real multi-process gateway, ``serving gateway --workers N``, at N = 1 and N = 2 (issue 12: with
``--workers 2``, no-op throughput ÷ ``--workers 1``; no target).

Each run starts the CLI as a process of its own:

- attached to the bench's Ray cluster by its GCS address, serving the bench's Serve applications (``bench-noop``,
  ``bench-minilm-l6``: SERVING_SERVE_APP_NAME is ``APP_PREFIX``) described by the bench's registry file;
- with the Redis quota (SERVING_REDIS_URL: N > 1 requires it; N = 1 has it too, so that only N changes), a partner
  on the G rows' metered plan in the bench's own partner store (SERVING_DATABASE_URL), and a data directory of its
  own per run (ledger, journals) inside the bench's temporary directory;
- the access log on, as ``serving run`` has it: on the process's stderr, which goes to a file (``gateway.log``).

With N = 1 the CLI runs one gateway process (no supervisor); with N = 2 a supervisor runs two worker processes that
share the gRPC port through SO_REUSEPORT, so the kernel spreads *connections* over them: the client subprocess opens
``CHANNELS`` gRPC channels, each its own TCP connection, the bench's concurrency spread over them (W1 gets the same
channels). Runs go W1, W2, W2, W1 (each N's mean sits at the same midpoint); each run starts its gateway and stops it
(SIGTERM, wait) after, so one is up at a time.

CPU: utime + stime (/proc/<pid>/stat, every thread) of the worker processes (for N = 1 the gateway process itself)
over the measured window, ÷ the requests completed in it; the supervisor's is shown apart. The client measures from
an instant of the parent's clock (CLOCK_MONOTONIC, the same in every process), so both windows coincide. An idle
gateway's background work (polling Serve) counts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchlib.common import (
    APP_PREFIX,
    CACHE_DIR,
    NOOP_MODEL,
    RAY_ENV,
    Config,
    Measurement,
    Ratio,
    mean_of,
    measurement,
)
from benchlib.overhead import METERED_PLAN, forget_partner_in_redis, redis_reachable
from benchlib.stack import Stack, partner_key
from benchlib.workers import spawn_worker

WORKERS_PREFIX = "W"
ORDER = ((1, 1), (2, 1), (2, 2), (1, 2))  # (N, run): mirrored, as the G rows
CHANNELS = 8  # gRPC channels (TCP connections) from the client: what SO_REUSEPORT spreads
PARTNER = "bench-workers"
READY_TIMEOUT_S = 180.0  # a gateway attaches to Ray and waits for the models: slow on a busy machine
STOP_TIMEOUT_S = 60.0  # past this after SIGTERM every process of the gateway is killed
START_DELAY_S = 2.0  # the client subprocess starts (imports) within this; lateness up to the warm-up is absorbed
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Step = Callable[[], Awaitable[Measurement]]
RunPlan = Callable[[list[Step]], Awaitable[list[Measurement]]]
Wrap = Callable[[Awaitable[Measurement]], Awaitable[Measurement]]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...; utime and stime at 11, 12
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        pass
    return True


def log_tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


def access_lines(path: Path) -> int:
    """Access-log lines (JSON with a request id) in the gateway's stderr file."""
    with contextlib.suppress(OSError), path.open("rb") as f:
        return sum(line.count(b'"request_id"') for line in f)
    return 0


async def discard(pipe: asyncio.StreamReader) -> None:
    while await pipe.read(1 << 16):
        pass


@dataclass
class GatewayProcess:
    """A running ``serving gateway --workers N``: its process (the supervisor when N > 1), ports and workers."""

    workers: int
    process: asyncio.subprocess.Process
    ports: dict[str, Any]
    run_dir: Path
    log: IO[bytes]
    reader: asyncio.Task[None]  # its stdout, read on (a full pipe would block it)
    worker_pids: list[int]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_port']}"

    @property
    def supervisor(self) -> int | None:
        return self.process.pid if self.workers > 1 else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / "gateway.log"

    async def stop(self) -> int:
        """SIGTERM, then waits (bounded: then every process of it is killed); returns the exit code."""
        await terminate(self.process, self.worker_pids)
        with contextlib.suppress(Exception):  # EOF once it exited; bounded all the same
            async with asyncio.timeout(5.0):
                await self.reader
        self.reader.cancel()
        self.log.close()
        return self.process.returncode if self.process.returncode is not None else -1


async def terminate(process: asyncio.subprocess.Process, worker_pids: list[int]) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    for pid in worker_pids:  # gone once the supervisor exited (it waits for them); killed otherwise
        if pid != process.pid and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def gateway_env(stack: Stack, run_dir: Path, redis_url: str, gateway_id: str) -> dict[str, str]:
    """This environment without SERVING_* (the bench fixes every setting that matters) plus the run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    # Like an operator's shell: the bench's ray.init may have set RAY_AUTH_MODE for itself; the gateway finds the
    # cluster's token on its own (serving.cli._ray_init).
    env.pop("RAY_AUTH_MODE", None)
    return env | {
        **RAY_ENV,
        "SERVING_DATA_DIR": str(run_dir),
        "SERVING_DATABASE_URL": str(stack.tmp / "serving.db"),  # the bench's partner store
        "SERVING_LEDGER_DATABASE_URL": str(run_dir / "ledger.db"),
        "SERVING_MODEL_REGISTRY": str(stack.settings.model_registry),
        "SERVING_MODEL_CACHE_DIR": str(CACHE_DIR),
        "SERVING_SERVE_APP_NAME": APP_PREFIX,
        "SERVING_REDIS_URL": redis_url,
        "SERVING_GATEWAY_ID": gateway_id,
        "SERVING_ACCESS_LOG": "1",
        "SERVING_SHUTDOWN_GRACE_S": "2",
        "SERVING_FINAL_SCRAPE_WAIT_S": "0",  # nothing scrapes it
    }


def open_log(run_dir: Path) -> IO[bytes]:
    """The run's new data directory and the file that takes the gateway's stderr (its logs, the access log)."""
    run_dir.mkdir(parents=True)
    return (run_dir / "gateway.log").open("wb")


async def start_gateway(stack: Stack, workers: int, run_dir: Path, redis_url: str) -> GatewayProcess:
    """``serving gateway --workers N`` on free ports, once it printed its READY line."""
    import ray

    argv = [
        sys.executable, "-m", "serving.cli", "gateway", "--workers", str(workers),
        "--ray-address", ray.get_runtime_context().gcs_address,
        "--grpc-port", "0", "--http-port", "0", "--ops-port", "0",
    ]  # fmt: skip
    env = gateway_env(stack, run_dir, redis_url, f"bench-{run_dir.name}")
    log = open_log(run_dir)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    except BaseException:
        log.close()
        raise
    assert process.stdout is not None
    ports: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while line := await process.stdout.readline():
                if line.startswith(b"READY "):
                    ports = json.loads(line[6:])
                    break
        if ports is None:
            raise RuntimeError(f"it exited with code {await process.wait()} before READY")
        pids = children(process.pid) if workers > 1 else [process.pid]
        if len(pids) != workers:
            raise RuntimeError(f"{len(pids)} worker processes, not {workers}")
    except BaseException as exc:
        await terminate(process, children(process.pid))
        log.close()
        if isinstance(exc, Exception):
            why = "not ready in time" if isinstance(exc, TimeoutError) else str(exc)
            tail = log_tail(run_dir / "gateway.log")
            raise RuntimeError(f"serving gateway --workers {workers} did not start ({why}):\n{tail}") from exc
        raise
    reader = asyncio.create_task(discard(process.stdout))
    return GatewayProcess(workers, process, ports, run_dir, log, reader, pids)


async def cpu_over(pids: list[int], start: float, end: float) -> list[float]:
    """Each process's CPU seconds between the ``time.perf_counter()`` instants ``start`` and ``end``."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = [cpu_seconds(pid) for pid in pids]
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]


def run_label(workers: int) -> str:
    return f"W{workers}: no-op, serving gateway --workers {workers} (Redis quota, {CHANNELS} gRPC channels)"


async def workers_run(key: str, gateway: GatewayProcess, api_key: str, cfg: Config) -> Measurement:
    """The bench's concurrency over ``CHANNELS`` connections from a client subprocess; the workers' CPU over the
    measured window."""
    measure_from = time.perf_counter() + START_DELAY_S + cfg.warmup_s
    job = {
        "kind": "load",
        "target": gateway.target,
        "api_key": api_key,
        "model": NOOP_MODEL,
        "concurrency": cfg.concurrency,
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.duration_s,
        "channels": CHANNELS,
        "measure_from": measure_from,
    }
    supervisor = [] if gateway.supervisor is None else [gateway.supervisor]
    pids = [*gateway.worker_pids, *supervisor]
    cpu = asyncio.ensure_future(cpu_over(pids, measure_from, measure_from + cfg.duration_s))
    try:
        stats = await spawn_worker(job)
        deltas = await cpu
    finally:
        cpu.cancel()
    result = measurement(key, run_label(gateway.workers), "req/s", stats)
    worker_cpu = deltas[: gateway.workers]
    total = sum(worker_cpu)
    requests = max(1, result.completed)
    result.cpu_us = total * 1e6 / requests
    result.cpu_cores = total / cfg.duration_s
    if gateway.supervisor is not None and total > 0:
        split = "/".join(f"{100 * c / total:.0f}" for c in worker_cpu)
        result.label += f"; workers' CPU split {split} %, supervisor {deltas[-1] * 1e6 / requests:.0f} µs/request"
    return result


async def measure_scaleout(
    stack: Stack, store: Any, redis_url: str, cfg: Config, run_plan: RunPlan, wrap: Wrap
) -> tuple[list[Measurement], list[str]]:
    """Rows W (measured with ``run_plan``; ``wrap`` adds the replica's batch stats) and their notes. Needs Redis."""
    why_not = await redis_reachable(redis_url) if redis_url else "no --redis-url"
    if why_not is not None:
        note = f"W: rows skipped, --workers 2 needs Redis and Redis at {redis_url or '-'} is unreachable ({why_not})"
        print(note, flush=True)
        return [], [note]
    partner_id, api_key = partner_key(store, PARTNER, METERED_PLAN)
    note = (
        f"W: serving gateway --workers N as its own process on this Ray cluster (apps {APP_PREFIX}-*; N = 1: one "
        "gateway process, N = 2: a supervisor and 2 workers sharing the port through SO_REUSEPORT), RedisQuota at "
        f"{redis_url} for both, partner on the metered plan, access log ON for both, into a file (the process's "
        f"stderr); client: one subprocess, {CHANNELS} gRPC channels, concurrency {cfg.concurrency}; each run starts "
        "and stops its gateway; CPU/request: the workers' utime + stime (/proc) over the measured window ÷ requests"
    )
    print(note, flush=True)
    notes = [note]

    def step(workers: int, run: int) -> Step:
        async def measure() -> Measurement:
            gateway = await start_gateway(stack, workers, stack.tmp / "workers" / f"w{workers}-{run}", redis_url)
            try:
                result = await wrap(workers_run(f"{WORKERS_PREFIX}{workers}#{run}", gateway, api_key, cfg))
            finally:
                code = await gateway.stop()
            notes.extend(stop_notes(result.key, gateway, code, result.completed))
            return result

        return measure

    try:
        measured = await run_plan([step(workers, run) for workers, run in ORDER])
    finally:
        await forget_partner_in_redis(redis_url, partner_id)
    return measured, notes


def stop_notes(key: str, gateway: GatewayProcess, code: int, completed: int) -> list[str]:
    """What went wrong stopping the run's gateway: an exit code, journal segments left (records not stored), fewer
    access-log lines than requests."""
    notes = []
    if code != 0:
        notes.append(f"{key}: the gateway exited with code {code}; its log ends: {log_tail(gateway.log_path, 600)!r}")
    if left := sorted((gateway.run_dir / "journal").rglob("*.jsonl")):
        notes.append(f"{key}: {len(left)} usage-journal segments left after the stop (records not stored)")
    if (lines := access_lines(gateway.log_path)) < completed:
        notes.append(f"{key}: {lines} access-log lines for {completed} requests measured")
    return notes


# --- what the report derives from the W rows ---------------------------------------------------------------


def workers_means(results: dict[str, Measurement]) -> list[Measurement]:
    """``W1``, ``W2``: each the mean of its two runs (rate, p50, CPU per request)."""
    means = []
    for workers in (1, 2):
        runs = [f"{WORKERS_PREFIX}{workers}#{n}" for n in (1, 2)]
        if all(run in results for run in runs):
            label = f"W{workers}: no-op, serving gateway --workers {workers} (mean of 2 runs)"
            mean = mean_of(results, runs, f"{WORKERS_PREFIX}{workers}", label)
            if all(results[r].cpu_us is not None for r in runs):
                mean.cpu_us = sum(results[r].cpu_us or 0.0 for r in runs) / 2
                mean.cpu_cores = sum(results[r].cpu_cores or 0.0 for r in runs) / 2
            means.append(mean)
    return means


def workers_ratios(results: dict[str, Measurement]) -> list[Ratio]:
    one, two = results.get(f"{WORKERS_PREFIX}1"), results.get(f"{WORKERS_PREFIX}2")
    if one is None or two is None:
        return []
    cores = os.cpu_count() or 0
    rows = [
        Ratio(
            f"W: no-op throughput, --workers 2 ÷ --workers 1 ({cores} cores shared with the replica, Ray, the client)",
            two.key,
            one.key,
            two.rate / one.rate,
            None,
        )
    ]
    if one.cpu_us is not None and two.cpu_us is not None:
        label = "W: gateway CPU per no-op request (all workers), --workers 2 − --workers 1"
        rows.append(Ratio(label, two.key, one.key, two.cpu_us - one.cpu_us, None, op="≤", unit="µs"))
    return rows


def workers_notes(results: dict[str, Measurement]) -> list[str]:
    if f"{WORKERS_PREFIX}2#1" not in results and f"{WORKERS_PREFIX}1#1" not in results:
        return []
    notes = [
        f"W rows: on {os.cpu_count()} cores the no-op replica, Ray (GCS, raylet, Serve controller), the load client "
        "and the gateway processes compete for the same cores, so W2 ÷ W1 is what a second gateway process buys on "
        "this machine, not the scaling on a machine with a core per worker"
    ]
    for workers in (1, 2):
        a, b = results.get(f"{WORKERS_PREFIX}{workers}#1"), results.get(f"{WORKERS_PREFIX}{workers}#2")
        if a and b:
            drift = abs(a.rate - b.rate) / max(a.rate, b.rate)
            if drift > 0.15:
                notes.append(f"{a.key} and {b.key} differ by {drift:.0%}: W2 ÷ W1 carries that much noise")
    return notes
