"""Issue 12 item 4: the hop from the gateway into Ray Serve, measured variant by variant (``bench_rayhop.py``).

What is measured is the path from a caller to the model replica, on the no-op model (or MiniLM), nothing else:
no auth, quota or metering. Each variant is one way of sending a one-text request (or a gateway micro-batch
of them) to the same Serve deployment (``serving.models.deployment.BatchedModel``):

- in-process callers (a subprocess attached to the Ray cluster; 32 asyncio callers in it): a DeploymentHandle
  with Serve's defaults, with the router on the caller's own event loop, with Serve's gRPC transport to the
  replica (``_by_reference=False``), with both, or the replica actor called directly (no Serve router);
  each one call per request and through the gateway's ``MicroBatcher`` (its default settings);
- a gRPC front (load from a separate client process over gRPC): our own grpc.aio server in a plain process
  micro-batching into a DeploymentHandle (today's shape), Serve's gRPC proxy in front of an ingress deployment
  that does the same (where the gateway core would live under option a), Serve's gRPC proxy in front of a
  deployment that is the no-op itself (the least option a can cost), and Serve's direct ingress (the ingress
  replica's own gRPC port, no proxy; ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, so a Ray instance of its own).

Every worker runs a fixed number of calls and reports throughput at concurrency 32, p50 at concurrency 1 and the
CPU seconds per request of the processes on the serving side: its own ``time.process_time()`` when it is the
caller, and ``/proc/<pid>/stat`` CPU times of the front, proxy, ingress and model processes (pids found through
``ActorHandle.__ray_call__``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import pickle
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.common import LOADTESTS, RAY_ENV, SENTENCES, percentile
from benchlib.workers import run_job

APP_PREFIX = "rayhop"
INGRESS_APP = f"{APP_PREFIX}-ingress"  # Serve gRPC ingress: the gateway core's stand-in, handle to the model
NOOP_INGRESS_APP = f"{APP_PREFIX}-noop-ingress"  # Serve gRPC ingress that is the no-op model itself
SERVICER = "serving_sdk.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server"
SERVE_NAMESPACE = "serve"
ENTRY_SCRIPT = LOADTESTS / "bench_rayhop.py"
WORKER_TIMEOUT_S = 600.0

Send = Callable[[list[str]], Awaitable[Any]]


def model_app(model: str) -> str:
    """The Serve application ``serving.models.deployment.deploy_models`` names for ``model``."""
    return f"{APP_PREFIX}-{model}"


# --- ways to cross into the replica ----------------------------------------------------------------------------


def handle_send(handle: Any, grpc_transport: bool) -> Send:
    """One ``infer`` call per send through a DeploymentHandle (Serve's router picks the replica). With
    ``grpc_transport`` the request travels over the replica's inter-deployment gRPC server instead of a Ray
    actor task (``_by_reference=False``, what ``RAY_SERVE_USE_GRPC_BY_DEFAULT=1`` makes the default)."""
    method = (handle.options(_by_reference=False) if grpc_transport else handle).infer

    async def send(items: list[str]) -> Any:
        return await method.remote(items)

    return send


def actor_send(actor: Any) -> Send:
    """One ``infer`` call per send straight to the replica actor, as Serve's router would send it
    (``ReplicaActor.handle_request``), without the router: no replica choice, no queue-length cache,
    no retries, no handle-side autoscaling metrics."""
    from ray.serve._private.common import RequestMetadata

    async def send(items: list[str]) -> Any:
        metadata = RequestMetadata(
            request_id=uuid.uuid4().hex, internal_request_id=uuid.uuid4().hex, call_method="infer"
        )
        return await actor.handle_request.remote(pickle.dumps(metadata), items)

    return send


def batched(send: Send) -> Send:
    """``send`` behind the gateway's micro-batcher with the gateway's default settings (what ``Router`` builds)."""
    from serving.gateway.microbatch import MicroBatcher
    from serving.settings import Batching

    settings = Batching()
    batcher: MicroBatcher[str, Any] = MicroBatcher(
        send, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_inflight
    )
    return batcher.submit


def embed_reply(request: Any, rows: Any) -> Any:
    """An ``EmbedResponse`` carrying ``rows`` (a float32 array or float lists), as the gateway answers."""
    from serving_sdk.v1 import inference_pb2

    values: list[list[float]] = rows.tolist() if hasattr(rows, "tolist") else list(rows)
    return inference_pb2.EmbedResponse(
        model=request.model,
        embeddings=[inference_pb2.Embedding(values=v) for v in values],
        request_id=request.request_id,
    )


# --- Serve ingress deployments (option a, and b in a direct-ingress cluster) ------------------------------------


class HopIngress:
    """Where the gateway core would live as a Serve gRPC ingress: the request micro-batched, then one handle
    call per batch to the model application (the same hop as today's gateway, from inside a replica)."""

    def __init__(self, target_app: str) -> None:
        from ray import serve

        self._send = batched(handle_send(serve.get_app_handle(target_app), grpc_transport=False))

    async def Embed(self, request: Any) -> Any:
        return embed_reply(request, await self._send(list(request.texts)))


class NoopIngress:
    """The no-op model as the gRPC ingress itself: Serve's gRPC proxy with no hop behind it (option a's floor)."""

    def __init__(self) -> None:
        from serving.models.noop import NoopRunner

        self._runner = NoopRunner()

    async def Embed(self, request: Any) -> Any:
        return embed_reply(request, [v.tolist() for v in self._runner.predict(list(request.texts))])


INGRESS_MAIN_LOOP_APP = f"{APP_PREFIX}-ingress-main-loop"
# User code on the replica's main loop, as RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets it: the gRPC request (proxy call
# or direct-ingress server) and the user method share one loop, no hand-off to the user-code thread.
MAIN_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def deploy_ingress(name: str, cls: type, *args: Any, env: dict[str, str] | None = None) -> None:
    """An ingress application at route ``/<name>``; small CPU share, room for every concurrent request; ``env``
    goes into its replicas' environment (Serve reads its flags there at import)."""
    from ray import serve

    from benchlib.plain import replica_runtime_env

    runtime_env = replica_runtime_env()
    runtime_env["env_vars"] = {**runtime_env["env_vars"], **(env or {})}
    deployment: Any = serve.deployment(cls)
    app = deployment.options(
        name=name,
        ray_actor_options={"num_cpus": 0.1, "runtime_env": runtime_env},
        max_ongoing_requests=256,
    ).bind(*args)
    serve.run(app, name=name, route_prefix=f"/{name}")


# --- finding Serve's actors and their processes -----------------------------------------------------------------


def serve_actor(prefix: str) -> Any:
    """The one named actor in Serve's namespace whose name starts with ``prefix``."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix)
    ]
    if len(names) != 1:
        raise RuntimeError(f"expected one Serve actor named {prefix}*, found {names}")
    return ray.get_actor(names[0], namespace=SERVE_NAMESPACE)


def replica_actor(app: str) -> Any:
    return serve_actor(f"SERVE_REPLICA::{app}#")


def proxy_actor() -> Any:
    return serve_actor("SERVE_PROXY_ACTOR")


def actor_pid(actor: Any) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid())))


def replica_runs_user_code_on_main_loop(actor: Any) -> bool:
    """Whether the replica runs user code on its main loop (``MAIN_LOOP_ENV`` applied)."""
    import ray

    def read(_self: Any) -> bool:
        from ray.serve._private import constants

        return not constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD

    return bool(ray.get(actor.__ray_call__.remote(read)))


def direct_ingress_grpc_port(actor: Any) -> int:
    """The gRPC port a direct-ingress replica listens on (allocated by the controller)."""
    import ray

    port = ray.get(actor.__ray_call__.remote(lambda self: self._replica_impl._grpc_port))
    if port is None:
        raise RuntimeError("the ingress replica has no direct-ingress gRPC port (RAY_SERVE_ENABLE_DIRECT_INGRESS?)")
    return int(port)


def attach_ray(address: str) -> None:
    """Join the benchmark's Ray instance from a worker subprocess."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)


# --- the fixed-count load driver and what a worker reports ------------------------------------------------------


@dataclass
class Sample:
    """One run of one variant. ``cpu_ms`` maps a role (caller, front, proxy, ingress, model) to CPU ms per
    request over the concurrency-32 calls."""

    key: str
    rate: float
    p50_c1_ms: float
    p50_c32_ms: float
    p99_c32_ms: float
    cpu_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Counts:
    concurrency: int = 32
    warmup_calls: int = 600
    calls: int = 4000
    c1_calls: int = 400

    @staticmethod
    def from_job(job: dict[str, Any]) -> Counts:
        return Counts(job["concurrency"], job["warmup_calls"], job["calls"], job["c1_calls"])


async def run_count(
    call: Callable[[int], Awaitable[object]], concurrency: int, calls: int
) -> tuple[float, list[float]]:
    """``concurrency`` closed-loop callers sharing ``calls`` tickets: wall seconds and per-call latencies."""
    tickets = itertools.count()
    latencies: list[float] = []

    async def caller() -> None:
        while (index := next(tickets)) < calls:
            sent = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process on this machine, from ``/proc/<pid>/stat`` (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_seconds(pids: dict[str, int], caller_role: str | None) -> dict[str, float]:
    """CPU seconds so far per role: ``caller_role`` is this process (``time.process_time()``), the rest by pid."""
    seconds: dict[str, float] = {}
    if caller_role is not None:
        seconds[caller_role] = time.process_time()
    for role, pid in pids.items():
        seconds[role] = seconds.get(role, 0.0) + process_cpu_seconds(pid)
    return seconds


async def measure(
    key: str, call: Callable[[int], Awaitable[object]], counts: Counts, pids: dict[str, int], caller_role: str | None
) -> Sample:
    await run_count(call, counts.concurrency, counts.warmup_calls)
    before = cpu_seconds(pids, caller_role)
    wall, latencies = await run_count(call, counts.concurrency, counts.calls)
    after = cpu_seconds(pids, caller_role)
    _, alone = await run_count(call, 1, counts.c1_calls)
    return Sample(
        key=key,
        rate=counts.calls / wall,
        p50_c1_ms=percentile(alone, 0.5) * 1000,
        p50_c32_ms=percentile(latencies, 0.5) * 1000,
        p99_c32_ms=percentile(latencies, 0.99) * 1000,
        cpu_ms={role: (after[role] - before[role]) * 1000 / counts.calls for role in after},
    )


def text_call(send: Send) -> Callable[[int], Awaitable[object]]:
    async def call(index: int) -> None:
        await send([SENTENCES[index % len(SENTENCES)]])

    return call


# --- worker subprocesses ----------------------------------------------------------------------------------------


async def inproc_worker(job: dict[str, Any]) -> Sample:
    """Callers in this process, attached to the cluster: the handle or actor variant, micro-batched or not.
    The handle is made on the running loop (the router may run on it: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0)."""
    from ray import serve

    if job["target"] == "actor":
        send = actor_send(replica_actor(job["model_app"]))
    else:
        send = handle_send(serve.get_app_handle(job["model_app"]), job["grpc_transport"])
    if job["batched"]:
        send = batched(send)
    return await measure(job["key"], text_call(send), Counts.from_job(job), job["pids"], "caller")


async def client_worker(job: dict[str, Any]) -> Sample:
    """One-text Embed calls over one grpc.aio channel; ``app`` (Serve's proxy) picks the application."""
    import grpc

    from serving_sdk.v1 import inference_pb2, inference_pb2_grpc

    metadata = (("application", job["app"]),) if job.get("app") else None
    async with grpc.aio.insecure_channel(job["target"]) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def call(index: int) -> None:
            request = inference_pb2.EmbedRequest(model=job["model"], texts=[SENTENCES[index % len(SENTENCES)]])
            await stub.Embed(request, metadata=metadata)

        return await measure(job["key"], call, Counts.from_job(job), job["pids"], None)


def front_worker(job: dict[str, Any]) -> None:
    """Today's shape without the core: a grpc.aio server micro-batching into a DeploymentHandle. Prints
    ``READY <port> <pid>`` once serving; stops when its stdin closes."""
    attach_ray(job["address"])
    asyncio.run(serve_front(job["model_app"]))


async def serve_front(target_app: str) -> None:
    import grpc
    from ray import serve

    from serving_sdk.v1 import inference_pb2_grpc

    send = batched(handle_send(serve.get_app_handle(target_app), grpc_transport=False))

    class Servicer(inference_pb2_grpc.InferenceServiceServicer):  # type: ignore[misc]
        async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return embed_reply(request, await send(list(request.texts)))

    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY {port} {os.getpid()}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(1.0)


def run_worker(raw_job: str) -> None:
    """The body of a ``bench_rayhop.py --worker JOB`` subprocess."""
    job = json.loads(raw_job)
    if job["kind"] == "front":
        front_worker(job)
        return
    if job["kind"] == "inproc":
        attach_ray(job["address"])
        sample = asyncio.run(inproc_worker(job))
    else:
        sample = asyncio.run(client_worker(job))
    print("RESULT " + json.dumps(asdict(sample)), flush=True)


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **RAY_ENV, **extra}


async def spawn_worker(job: dict[str, Any], env: dict[str, str]) -> Sample:
    return Sample(**await run_job(job, ENTRY_SCRIPT, env, WORKER_TIMEOUT_S))


@dataclass
class Front:
    process: asyncio.subprocess.Process
    port: int
    pid: int

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), 30)


async def start_front(address: str, target_app: str) -> Front:
    """The grpc.aio front in a subprocess; returns once it has printed its READY line."""
    job = {"kind": "front", "address": address, "model_app": target_app}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ENTRY_SCRIPT),
        "--worker",
        json.dumps(job),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=worker_env({}),
    )
    assert proc.stdout is not None
    while line := (await asyncio.wait_for(proc.stdout.readline(), 120)).decode():
        if line.startswith("READY "):
            _, port, pid = line.split()
            return Front(proc, int(port), int(pid))
    raise RuntimeError(f"the gRPC front exited before it was ready (exit {await proc.wait()})")
