"""Fair admission as a latency figure: partner B's latency alone and under partner A's flood, with fair queuing
and with first come, first served. ``tests/test_fairness.py`` asserts the queue's decisions (events and counts);
this prints what they are worth in milliseconds on this machine. Nothing is asserted.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench_fairness.py [--json fairness.json]

It starts Ray, deploys MiniLM as the default registry has it, and runs the real gateway in this process with the
model's ``max_concurrency`` set to ``--capacity`` (1): one request in flight, the rest wait in the fair queue.
Clients are subprocesses of this script (``--worker``), so the gateway never shares its event loop with the load.

1. calibrate: four closed-loop callers measure what the slot serves (req/s, one text per request).
2. for a gateway with fair queuing (``SERVING_ADMISSION_FAIR=1``) and one without (``=0``: one FIFO queue):
   B alone, then B while A keeps ``--flooders`` (10) requests outstanding. B sends open-loop (one request every
   interval, whatever the replies do) at ``--b-share`` (0.25) of the calibrated rate, half of its fair share of
   the slot when two partners compete, so that on a slow or busy machine B still sends less than its share.

Printed per mode: B's p50 and p90 alone and under the flood, the ratio of the p50s, B's success rate under the
flood, and B's share of the slot's grants while it was sending under the flood (the fair queue's own record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchlib.common import APP_PREFIX, CACHE_DIR, EMBED_MODEL, RAY_ENV, SENTENCES, fmt, percentile
from benchlib.report import machine
from benchlib.stack import init_local_ray, open_store, partner_key, stop_stack

# --- client subprocesses -------------------------------------------------------------------------------------


async def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """``calibrate``: four closed-loop callers for ``seconds``. ``flood``: ``flooders`` closed-loop callers until
    stdin closes (prints READY once as many requests have come back). ``paced``: ``requests`` open-loop
    requests, one every ``interval_s``. No retries: a request the gateway sheds counts as failed."""
    from serving_sdk import ApiError, AsyncClient, RetryPolicy

    latencies: list[float] = []
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        sent = time.perf_counter()
        try:
            await client.embed([SENTENCES[index % len(SENTENCES)]], model=EMBED_MODEL)
        except ApiError:
            failed += 1
            return
        latencies.append(time.perf_counter() - sent)

    async with AsyncClient(job["target"], job["api_key"], retry=RetryPolicy(attempts=1)) as client:
        await one(0)  # connect before anything is measured
        latencies.clear()
        loop = asyncio.get_running_loop()
        if job["kind"] == "calibrate":
            end = loop.time() + job["seconds"]

            async def closed_loop(index: int) -> None:
                while loop.time() < end:
                    await one(index)

            await asyncio.gather(*(closed_loop(i) for i in range(4)))
            return {"rate": len(latencies) / job["seconds"]}
        if job["kind"] == "flood":
            stop = asyncio.Event()

            async def flooder(index: int) -> None:
                while not stop.is_set():
                    await one(index)
                    if len(latencies) + failed == job["flooders"]:
                        print("READY", flush=True)

            flooders = [asyncio.create_task(flooder(i)) for i in range(job["flooders"])]
            await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when B is done
            stop.set()
            await asyncio.gather(*flooders)
        else:
            first = loop.time() + job["interval_s"]

            async def paced(index: int) -> None:
                start: asyncio.Future[None] = loop.create_future()
                loop.call_at(first + index * job["interval_s"], start.set_result, None)
                await start
                await one(index)

            await asyncio.gather(*(paced(i) for i in range(job["requests"])))
    return {"latencies_s": latencies, "failed": failed}


async def spawn(job: dict[str, Any]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", json.dumps(job),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, **RAY_ENV},
    )  # fmt: skip


async def read_line(process: asyncio.subprocess.Process, prefix: str) -> str:
    assert process.stdout is not None
    while line := (await process.stdout.readline()).decode():
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise RuntimeError(f"worker exited (code {await process.wait()}) before printing {prefix!r}")


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    process = await spawn(job)
    assert process.stdin is not None
    process.stdin.close()
    result: dict[str, Any] = json.loads(await read_line(process, "RESULT "))
    await process.wait()
    return result


# --- the measurement -----------------------------------------------------------------------------------------


@dataclass
class Row:
    mode: str  # "fair" (start-time fair queuing) or "fifo"
    alone_p50_ms: float
    alone_p90_ms: float
    flood_p50_ms: float
    flood_p90_ms: float
    ratio: float  # p50 under the flood ÷ p50 alone
    b_success: float  # under the flood
    b_grant_share: float  # under the flood: B's share of the grants from its first to its last
    a_served: int


def ms(latencies: list[float], q: float) -> float:
    return percentile([s * 1000 for s in latencies], q)


def grant_share(grants: list[Any], partner: str) -> float:
    mine = [i for i, grant in enumerate(grants) if grant.partner == partner]
    return len(mine) / (mine[-1] - mine[0] + 1) if mine else 0.0


async def measure_mode(fair: bool, stack: dict[str, Any], args: argparse.Namespace, interval_s: float) -> Row:
    from serving.gateway.app import Gateway

    mode = "fair" if fair else "fifo"
    base = stack["settings"]
    settings = replace(base, data_dir=stack["tmp"] / mode, admission=replace(base.admission, fair=fair))
    store = stack["store"]
    _, a_key = partner_key(store, f"flooder-{mode}", stack["plan"])
    _, alone_key = partner_key(store, f"alone-{mode}", stack["plan"])
    b_id, b_key = partner_key(store, f"fair-share-{mode}", stack["plan"])  # B under the flood
    gateway = Gateway(settings, stack["specs"], stack["handles"], store)
    await gateway.start()
    try:
        target = f"127.0.0.1:{gateway.grpc_port}"
        paced = {"kind": "paced", "target": target, "interval_s": interval_s, "requests": args.b_requests}
        alone = await run_job({**paced, "api_key": alone_key})
        flood = await spawn({"kind": "flood", "target": target, "api_key": a_key, "flooders": args.flooders})
        await read_line(flood, "READY")
        loaded = await run_job({**paced, "api_key": b_key})
        grants = gateway.admission.recent_grants(EMBED_MODEL)
        assert flood.stdin is not None
        flood.stdin.close()
        a_result = json.loads(await read_line(flood, "RESULT "))
        await flood.wait()
    finally:
        await gateway.stop()
    alone_p50, flood_p50 = ms(alone["latencies_s"], 0.5), ms(loaded["latencies_s"], 0.5)
    return Row(
        mode=mode,
        alone_p50_ms=alone_p50,
        alone_p90_ms=ms(alone["latencies_s"], 0.9),
        flood_p50_ms=flood_p50,
        flood_p90_ms=ms(loaded["latencies_s"], 0.9),
        ratio=flood_p50 / alone_p50,
        b_success=len(loaded["latencies_s"]) / args.b_requests,
        b_grant_share=grant_share(grants, b_id),
        a_served=len(a_result["latencies_s"]),
    )


async def measure(stack: dict[str, Any], args: argparse.Namespace) -> tuple[float, list[Row]]:
    from serving.gateway.app import Gateway

    _, key = partner_key(stack["store"], "calibrate", stack["plan"])
    settings = replace(stack["settings"], data_dir=stack["tmp"] / "calibrate")
    gateway = Gateway(settings, stack["specs"], stack["handles"], stack["store"])
    await gateway.start()
    try:
        target = f"127.0.0.1:{gateway.grpc_port}"
        calibration = await run_job({"kind": "calibrate", "target": target, "api_key": key, "seconds": args.calibrate})
    finally:
        await gateway.stop()
    rate = float(calibration["rate"])
    interval_s = 1.0 / (args.b_share * rate)
    print(f"the slot serves {rate:.1f} req/s; B sends one request every {interval_s * 1000:.0f} ms", flush=True)
    rows = []
    for fair in (True, False):
        rows.append(await measure_mode(fair, stack, args, interval_s))
        print(f"  {rows[-1]}", flush=True)
    return rate, rows


def start(tmp: Path, capacity: int) -> dict[str, Any]:
    from ray import serve

    from serving.models.deployment import deploy_models
    from serving.models.registry import load_registry
    from serving.plans import Plan
    from serving.settings import Settings

    minilm = next(spec for spec in load_registry() if spec.id == EMBED_MODEL)
    spec = replace(minilm, admission=replace(minilm.admission, max_concurrency=capacity))
    settings = Settings(
        data_dir=tmp, model_cache_dir=CACHE_DIR, grpc_port=0, http_port=0, ops_port=0, shutdown_grace_s=1.0
    ).validate()
    init_local_ray()
    serve.start(proxy_location="Disabled")  # the gateway calls the model through its handle; no HTTP proxy
    handles = deploy_models([spec], CACHE_DIR, APP_PREFIX)
    store = open_store(tmp / "serving.db")
    plan = Plan(name="bench-unlimited")  # no limits: this measures admission, not quota
    return {"tmp": tmp, "settings": settings, "specs": [spec], "handles": handles, "store": store, "plan": plan}


def report(rate: float, rows: list[Row], args: argparse.Namespace, before: dict[str, Any]) -> None:
    after = machine()
    print()
    print(
        f"capacity {args.capacity}, slot {rate:.1f} req/s alone; B open-loop at {args.b_share:g} × that, "
        f"{args.b_requests} requests per phase; A {args.flooders} outstanding; load average "
        f"{before['loadavg_1m']:.2f} before, {after['loadavg_1m']:.2f} after; {after['cpu_model']} × {after['cpus']}"
    )
    print()
    print("| queue | B p50 alone | B p90 alone | B p50 flood | B p90 flood | ×p50 | B ok | B share | A served |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.mode} | {fmt(row.alone_p50_ms)} ms | {fmt(row.alone_p90_ms)} ms | {fmt(row.flood_p50_ms)} ms | "
            f"{fmt(row.flood_p90_ms)} ms | {fmt(row.ratio, 2)} | {row.b_success:.0%} | {row.b_grant_share:.0%} | "
            f"{row.a_served} |"
        )
    if args.json is not None:
        data = {"rate": rate, "rows": [asdict(row) for row in rows], "before": before, "after": after}
        args.json.write_text(json.dumps(data, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--capacity", type=int, default=1, help="the model's admission max_concurrency")
    parser.add_argument("--flooders", type=int, default=10, help="requests A keeps outstanding")
    parser.add_argument("--b-share", type=float, default=0.25, help="B's rate as a share of the calibrated slot rate")
    parser.add_argument("--b-requests", type=int, default=40, help="B's requests per phase")
    parser.add_argument("--calibrate", type=float, default=5.0, help="seconds of calibration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(asyncio.run(run_worker(json.loads(args.worker)))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    before = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        print("starting Ray and deploying MiniLM...", flush=True)
        try:
            stack = start(Path(tmp), args.capacity)
            rate, rows = asyncio.run(measure(stack, args))
            stack["store"].close()
        finally:
            stop_stack()
    report(rate, rows, args, before)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
