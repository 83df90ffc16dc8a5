"""Side-by-side throughput ratios for the serving stack, measured in one run on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench.py [--json results.json]

It starts Ray, deploys MiniLM and a no-op model through ``serving.models.deployment``, runs the real gateway
(gRPC front door, auth, micro-batching) in this process, and measures, interleaved with their baselines:

  A  embeddings through the whole stack (client process → gRPC → gateway → Ray replica), texts/s,
     ÷ the raw model in a separate process encoding batches of the gateway's batch cap (1 and 2 torch threads)
  B  the no-op model through the whole stack, req/s, ÷ a bare grpc.aio server returning a fixed response
     of the same size, called by the same client (``serving_sdk.AsyncClient``) at the same concurrency
  C  plain Ray Serve as its docs show: one ``@serve.batch`` deployment called once per request through a
     DeploymentHandle from the driver, (i) no-op and (ii) MiniLM, against the same baselines
  A0/B0  A and B through a second gateway with micro-batching off (cap 1: one handle call per request),
     so A ÷ A0 and B ÷ B0 show what the gateway's micro-batching buys
  G  the gateway with auth + quota + metering ON (the real Gateway: MemoryQuota, and again with RedisQuota)
     ÷ OFF (the same front door and router around a Core with no-op stand-ins), on the no-op model:
     throughput ON ÷ OFF (target ≥ 0.9) and p50(ON) − p50(OFF) (target ≤ 1 ms); GM the same on MiniLM
  C-http  plain Ray Serve called over HTTP through its own proxy, as its batching guide shows
  S  a concurrency sweep 1 → 256 through the whole stack (MiniLM and no-op): throughput must not fall as
     concurrency rises; p99 at 256 ÷ p99 at 1
  CPU  the gateway process's CPU µs per no-op request (ΔCPU of this process over a fixed number of requests,
     after a warm-up), everything ON (MemoryQuota, then RedisQuota; access log on) over gRPC, native HTTP
     (POST /v1/embed) and the OpenAI route (POST /v1/embeddings), next to the bare grpc.aio echo server's
     (target: ≤ 300 µs with the Redis quota); also OFF over gRPC and ON-redis at concurrency 1
  W  the real ``serving gateway --workers N`` process (N = 1, 2: W1, W2, W2, W1) attached to this Ray cluster,
     Redis quota, metered partner, no-op model from one client on 8 gRPC channels: W2 ÷ W1 throughput (no
     target; on 2 cores the replica, Ray and the client compete with the gateways), p50, the workers' CPU per request

The same command runs on a CUDA machine: ``--device auto`` (the default) puts MiniLM (stack replica, plain
Serve, raw baseline) on the GPU when torch sees one, ``--dtype float16|bfloat16`` picks half precision there,
and each MiniLM replica asks Ray for ``--num-gpus`` (default: 0.25 when CUDA is present, else 0). See docs/gpu.md.

Load clients and the raw model run in subprocesses of this script (``--worker``), so a measured server never
shares its event loop with the client that loads it. Nothing is asserted: it prints ratios (and latencies).
The code is in ``loadtests/benchlib``: common (types, texts, load driver), workers (client and raw-model
subprocesses), plain (option C), stack (Ray, deployments, echo server, partners), overhead (rows G),
cpu (rows CPU), scaleout (rows W), runs (the plan and the gateways' lifetime), report (tables and JSON).
``loadtests/profile_gateway.py`` profiles the same gateway under load with py-spy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchlib.common import EMBED_MODEL, NOOP_MODEL
from benchlib.sweep import DEFAULT_LEVELS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each measurement")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per row")
    parser.add_argument(
        "--rows",
        choices=("all", "stack", "overhead", "sweep", "cpu", "workers"),
        default="all",
        help="stack: echo/raw/A/B/C/C-http/A0/B0; overhead: G; sweep: S; cpu: gateway CPU per request; "
        "workers: W1/W2 (serving gateway --workers 1 and 2)",
    )
    parser.add_argument("--cpu-requests", type=int, default=3000, help="requests measured per CPU row")
    parser.add_argument("--cpu-warmup", type=int, default=500, help="requests of warm-up before each CPU row")
    parser.add_argument(
        "--sweep-levels",
        default=",".join(str(c) for c in DEFAULT_LEVELS),
        help="comma-separated concurrency levels of the sweep ('' skips it)",
    )
    parser.add_argument("--device", default="auto", help="MiniLM's device: auto (CUDA when present), cpu, cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--num-gpus", type=float, help="GPU share per MiniLM replica (default 0.25 with CUDA, else 0)")
    parser.add_argument(
        "--overhead-models",
        default=NOOP_MODEL,
        help=f"comma-separated models for the G rows: {NOOP_MODEL} (default), {EMBED_MODEL} (adds the GM rows)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="RedisQuota for the G ON-redis and the W rows ('' skips them)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.overhead_models.split(",") if m.strip()]
    if unknown := set(models) - {NOOP_MODEL, EMBED_MODEL}:
        parser.error(f"--overhead-models: unknown {sorted(unknown)}; use {NOOP_MODEL} and/or {EMBED_MODEL}")
    args.overhead_models = models
    args.sweep_levels = [int(c) for c in args.sweep_levels.split(",") if c.strip()]
    return args


def gateway_batch_cap() -> int:
    from serving.settings import Settings

    return Settings().batching.max_batch_size


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        from benchlib.workers import run_worker

        run_worker(args.worker)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchlib.common import Config
    from benchlib.report import machine, report
    from benchlib.runs import Selection, measure_all
    from benchlib.stack import Hardware, describe_batching, start_stack, stop_stack

    from serving import eventloop
    from serving.settings import load_settings

    cuda = cuda_available()
    device = "cuda" if args.device == "auto" and cuda else "cpu" if args.device == "auto" else args.device
    num_gpus = args.num_gpus if args.num_gpus is not None else (0.25 if device == "cuda" else 0.0)
    hardware = Hardware(device=device, dtype=args.dtype, num_gpus=num_gpus)
    # The raw baseline encodes batches of the gateway's micro-batch cap: the largest batch the stack forms.
    raw_batch = min(args.concurrency, gateway_batch_cap())
    cfg = Config(
        args.concurrency,
        args.warmup,
        args.duration,
        raw_batch,
        device=device,
        dtype=args.dtype,
        cpu_requests=args.cpu_requests,
        cpu_warmup=args.cpu_warmup,
    )
    selection = Selection(
        stack_rows=args.rows in ("all", "stack"),
        overhead_models=args.overhead_models if args.rows in ("all", "overhead") else [],
        redis_url=args.redis_url,
        sweep_levels=args.sweep_levels if args.rows in ("all", "sweep") else [],
        cpu_rows=args.rows in ("all", "cpu"),
        workers_rows=args.rows in ("all", "workers"),
    )
    before = machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        print("starting Ray and deploying the models...", flush=True)
        started = time.perf_counter()
        try:
            stack = start_stack(Path(tmp), hardware, with_plain=selection.stack_rows)
            note = describe_batching(stack) + f"; MiniLM on {device}, {args.dtype}, {num_gpus:g} GPU per replica"
            print(f"deployed in {time.perf_counter() - started:.0f} s; {note}", flush=True)
            outcome = eventloop.run(measure_all(stack, cfg, selection), load_settings().event_loop)
        finally:
            stop_stack()
    setup = [note, *outcome.notes]
    report(outcome.measured, cfg, setup, before, args.json, selection.sweep_levels, outcome.idle_cores)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
