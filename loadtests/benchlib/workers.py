"""Load generation in subprocesses (``bench.py --worker JOB``), so a measured server never shares its event
loop (or its GIL) with the client that loads it.

Four kinds of job: ``load`` (a ``serving_sdk.AsyncClient`` on one grpc.aio channel, ``concurrency``
closed-loop callers of one-text Embed requests), ``http`` (an ``httpx.AsyncClient`` posting one text per
request to plain Serve's HTTP proxy), ``raw`` (the MiniLM runner alone, encoding batches) and ``phased``
(one-text embeds through a gateway's chosen front door, in phases the parent paces over stdin/stdout:
warm-up, ``WARM``; on ``GO`` the measured phase, ``DONE``; on ``STOP`` the client closes; see ``phased_run``).
Each prints one ``RESULT {json}`` line that the parent reads back. A ``load`` job with ``channels`` > 1 spreads
its callers over that many clients, each on a TCP connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib.common import (
    ENTRY_SCRIPT,
    RAY_ENV,
    SENTENCES,
    Config,
    LoadStats,
    Measurement,
    drive,
    drive_count,
    measurement,
)

Call = Callable[[int], Awaitable[object]]
DOORS = ("grpc", "http", "openai")  # the gateway's front doors: gRPC Embed, POST /v1/embed, POST /v1/embeddings


async def own_connection(client: Any, target: str) -> None:
    """Gives ``client`` a channel of its own TCP connection: grpc shares one among a process's channels with equal
    arguments (its global subchannel pool), and a gateway's SO_REUSEPORT workers split connections, not calls."""
    import grpc

    shared = client._channel
    client._channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    await shared.close()


async def load_worker(job: dict[str, Any]) -> LoadStats:
    """``channels`` (default 1) clients, caller ``i`` on client ``i % channels``; with ``measure_from`` (an instant
    of the parent's ``time.perf_counter()``: CLOCK_MONOTONIC, shared by processes) the warm-up lasts until then."""
    from serving_sdk import AsyncClient

    channels = int(job.get("channels", 1))
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            # No idempotency key per call: the hot-path rows measure what they always did (a key costs a claim).
            await stack.enter_async_context(AsyncClient(job["target"], job["api_key"], auto_request_id=False))
            for _ in range(channels)
        ]
        if channels > 1:
            for client in clients:
                await own_connection(client, job["target"])

        async def call(index: int) -> None:
            await clients[index % channels].embed([SENTENCES[index % len(SENTENCES)]], model=job["model"])

        warmup_s = job["warmup_s"]
        if "measure_from" in job:
            warmup_s = max(0.0, job["measure_from"] - time.perf_counter())
        return await drive(call, job["concurrency"], warmup_s, job["duration_s"])


async def http_worker(job: dict[str, Any]) -> LoadStats:
    import httpx

    limits = httpx.Limits(max_connections=job["concurrency"], max_keepalive_connections=job["concurrency"])
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:

        async def call(index: int) -> None:
            response = await client.post(job["url"], json={"text": SENTENCES[index % len(SENTENCES)]})
            response.raise_for_status()

        return await drive(call, job["concurrency"], job["warmup_s"], job["duration_s"])


def raw_worker(job: dict[str, Any]) -> LoadStats:
    """The model alone, in this process: batches of ``batch`` texts, ``threads`` torch threads."""
    import torch

    from serving.models.embed import EmbedRunner

    torch.set_num_threads(job["threads"])
    runner = EmbedRunner(max_input_tokens=256)
    runner.setup(Path(job["model_dir"]), job["device"], job["dtype"])
    n, size = len(SENTENCES), job["batch"]
    batches = [[SENTENCES[(k + j) % n] for j in range(size)] for k in range(n)]
    start = time.perf_counter() + job["warmup_s"]
    end = start + job["duration_s"]
    latencies: list[float] = []
    k = 0
    while (sent := time.perf_counter()) < end:
        runner.predict(batches[k % n])
        k += 1
        finished = time.perf_counter()
        if start <= sent and finished <= end:
            latencies.append(finished - sent)
    # Only whole batches that ran inside the window count; the rate is over the time they took.
    return LoadStats(completed=len(latencies), seconds=sum(latencies) or 1.0, latencies_s=latencies)


@contextlib.asynccontextmanager
async def door_caller(door: str, target: str, api_key: str, model: str, connections: int) -> AsyncIterator[Call]:
    """``call(index)`` embedding one text through ``door``; ``target`` is host:port for gRPC (one channel), the
    gateway's base URL for the HTTP doors (``connections`` keep-alive connections)."""
    if door == "grpc":
        from serving_sdk import AsyncClient

        async with AsyncClient(target, api_key, auto_request_id=False) as client:

            async def call(index: int) -> None:
                await client.embed([SENTENCES[index % len(SENTENCES)]], model=model)

            yield call
        return
    import httpx

    path, field = {"http": ("/v1/embed", "texts"), "openai": ("/v1/embeddings", "input")}[door]
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=target, headers=headers, limits=limits, timeout=60.0) as http:

        async def post(index: int) -> None:
            response = await http.post(path, json={"model": model, field: [SENTENCES[index % len(SENTENCES)]]})
            response.raise_for_status()

        yield post


async def wait_for(word: str) -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != word:
        raise SystemExit(f"expected {word!r} from the parent, got {line!r}")


async def phased_worker(job: dict[str, Any]) -> LoadStats:
    """Warm-up of ``warmup`` requests, then on GO exactly ``requests`` requests (or, with ``seconds``, as many
    as fit in that time), all at ``concurrency``; the client stays open until STOP so its teardown is not
    measured."""
    c = job["concurrency"]
    async with door_caller(job["door"], job["target"], job["api_key"], job["model"], c) as call:
        await drive_count(call, c, job["warmup"])
        print("WARM", flush=True)
        await wait_for("GO")
        if job.get("seconds"):
            stats = await drive(call, c, 0.0, job["seconds"])
        else:
            stats = await drive_count(call, c, job["requests"])
        print("DONE", flush=True)
        await wait_for("STOP")
    return stats


def run_worker(raw_job: str) -> None:
    """The body of a worker subprocess."""
    job = json.loads(raw_job)
    if job["kind"] == "load":
        stats = asyncio.run(load_worker(job))
    elif job["kind"] == "http":
        stats = asyncio.run(http_worker(job))
    elif job["kind"] == "phased":
        stats = asyncio.run(phased_worker(job))
    else:
        stats = raw_worker(job)
    print("RESULT " + json.dumps(asdict(stats)), flush=True)


async def run_job(
    job: dict[str, Any], entry: Path = ENTRY_SCRIPT, env: dict[str, str] | None = None, timeout_s: float | None = None
) -> dict[str, Any]:
    """Runs ``entry --worker JOB`` in a subprocess; returns the JSON of its last ``RESULT`` line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(entry),
        "--worker",
        json.dumps(job),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **RAY_ENV, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        name = job.get("key", job.get("kind"))
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{err.decode()[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


async def spawn_worker(job: dict[str, Any]) -> LoadStats:
    data = await run_job(job)
    return LoadStats(data["completed"], data["seconds"], data["latencies_s"])


async def grpc_run(key: str, label: str, unit: str, target: str, api_key: str, model: str, cfg: Config) -> Measurement:
    """``cfg.concurrency`` one-text Embed callers against ``target``, from a client subprocess."""
    job = {
        "kind": "load",
        "target": target,
        "api_key": api_key,
        "model": model,
        "concurrency": cfg.concurrency,
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.duration_s,
    }
    return measurement(key, label, unit, await spawn_worker(job))


async def http_run(key: str, label: str, url: str, cfg: Config) -> Measurement:
    """``cfg.concurrency`` one-text POSTs to ``url`` (plain Serve's HTTP proxy), from a client subprocess."""
    job = {
        "kind": "http",
        "url": url,
        "concurrency": cfg.concurrency,
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.duration_s,
    }
    return measurement(key, label, "req/s", await spawn_worker(job))


async def raw_run(key: str, model_dir: Path, threads: int, batch: int, cfg: Config) -> Measurement:
    """The raw model in a subprocess: batches of ``batch`` texts on ``threads`` torch threads, on the
    configured device and dtype (``cfg.device``/``cfg.dtype``: CUDA and fp16/bf16 where present)."""
    job = {
        "kind": "raw",
        "device": cfg.device,
        "dtype": cfg.dtype,
        "model_dir": str(model_dir),
        "threads": threads,
        "batch": batch,
        "warmup_s": cfg.warmup_s,
        "duration_s": cfg.duration_s,
    }
    label = f"raw MiniLM in-process, batch {batch}, {threads} torch thread{'s' if threads > 1 else ''}"
    result = measurement(key, label, "texts/s", await spawn_worker(job), items_per_call=batch)
    result.mean_batch = float(batch)
    return result


@dataclass
class Phased:
    """A phased run: the client's view of the measured phase, and this process's CPU and wall time over it."""

    load: LoadStats
    cpu_s: float
    wall_s: float


async def phased_run(job: dict[str, Any], on_warm: Callable[[], Awaitable[None]] | None = None) -> Phased:
    """Runs a ``phased`` worker and snapshots ``time.process_time()`` (every thread of this process: the
    gateways, Ray's core-worker threads of the handle path) between WARM and DONE. ``on_warm`` runs after the
    warm-up, before the measured phase and outside its CPU window (the profiler starts py-spy there)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ENTRY_SCRIPT),
        "--worker",
        json.dumps({**job, "kind": "phased"}),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **RAY_ENV},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout = proc.stdin, proc.stdout
    errors = asyncio.create_task(proc.stderr.read())  # drained all along: a full pipe would stall the worker

    async def expect(word: str) -> None:
        while (line := await stdout.readline()).decode().strip() != word:
            if not line:
                raise EOFError(f"worker exited before {word}")

    async def send(word: str) -> None:
        stdin.write(f"{word}\n".encode())
        await stdin.drain()

    try:
        await expect("WARM")
        if on_warm is not None:
            await on_warm()
        wall, cpu = time.perf_counter(), time.process_time()
        await send("GO")
        await expect("DONE")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await send("STOP")
        out = await stdout.read()
        await proc.wait()
    except Exception as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise RuntimeError(f"phased worker failed ({exc}):\n{(await errors).decode()[-4000:]}") from exc
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"phased worker failed (exit {proc.returncode}):\n{(await errors).decode()[-4000:]}")
    await errors
    data = json.loads(lines[-1].removeprefix("RESULT "))
    return Phased(LoadStats(data["completed"], data["seconds"], data["latencies_s"]), cpu, wall)
