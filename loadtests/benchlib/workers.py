"""Load generation in subprocesses (``bench.py --worker JOB``), so a measured server never shares its event
loop (or its GIL) with the client that loads it.

Three kinds of job: ``load`` (a ``serving.client.AsyncClient`` on one grpc.aio channel, ``concurrency``
closed-loop callers of one-text Embed requests), ``http`` (an ``httpx.AsyncClient`` posting one text per
request to plain Serve's HTTP proxy) and ``raw`` (the MiniLM runner alone, encoding batches).
Each prints one ``RESULT {json}`` line that the parent reads back.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib.common import ENTRY_SCRIPT, RAY_ENV, SENTENCES, Config, LoadStats, Measurement, drive, measurement


async def load_worker(job: dict[str, Any]) -> LoadStats:
    from serving.client import AsyncClient

    async with AsyncClient(job["target"], job["api_key"]) as client:

        async def call(index: int) -> None:
            await client.embed([SENTENCES[index % len(SENTENCES)]], model=job["model"])

        return await drive(call, job["concurrency"], job["warmup_s"], job["duration_s"])


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


def run_worker(raw_job: str) -> None:
    """The body of a worker subprocess."""
    job = json.loads(raw_job)
    if job["kind"] == "load":
        stats = asyncio.run(load_worker(job))
    elif job["kind"] == "http":
        stats = asyncio.run(http_worker(job))
    else:
        stats = raw_worker(job)
    print("RESULT " + json.dumps(asdict(stats)), flush=True)


async def spawn_worker(job: dict[str, Any]) -> LoadStats:
    env = {**os.environ, **RAY_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ENTRY_SCRIPT),
        "--worker",
        json.dumps(job),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job['kind']} failed (exit {proc.returncode}):\n{err.decode()[-4000:]}")
    data = json.loads(lines[-1].removeprefix("RESULT "))
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
