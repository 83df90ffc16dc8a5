"""Side-by-side throughput ratios for the serving stack, measured in one run on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench.py [--json results.json]

It starts Ray, deploys MiniLM and a no-op model through ``serving.models.deployment``, runs the real gateway
(gRPC front door, auth, micro-batching) in this process, and measures, interleaved with their baselines:

  A  embeddings through the whole stack (client process → gRPC → gateway → Ray replica), texts/s,
     ÷ the raw model in a separate process encoding batches of the gateway's batch cap (1 and 2 torch threads)
  B  the no-op model through the whole stack, req/s, ÷ a bare grpc.aio server returning a fixed response
     of the same size, called by the same client (``serving.client.AsyncClient``) at the same concurrency
  C  plain Ray Serve as its docs show: one ``@serve.batch`` deployment called once per request through a
     DeploymentHandle from the driver, (i) no-op and (ii) MiniLM, against the same baselines
  A0/B0  A and B through a second gateway with micro-batching off (cap 1: one handle call per request),
     so A ÷ A0 and B ÷ B0 show what the gateway's micro-batching buys

Load clients and the raw model run in subprocesses of this script (``--worker``), so a measured server never
shares its event loop with the client that loads it. Nothing is asserted: it prints ratios (and latencies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from ray import serve

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "models"
SCRIPT = str(Path(__file__).resolve())
EMBED_MODEL = "minilm-l6"
NOOP_MODEL = "noop"
APP_PREFIX = "bench"
RAY_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PLAIN_MAX_BATCH = 64
PLAIN_WAIT_S = 0.005

# Short, realistic, varied requests (10-20 words). 40 of them, so 32 concurrent clients keep changing texts.
SENTENCES: tuple[str, ...] = (
    "The delivery arrived two days late and the box was badly damaged on one side.",
    "Can you recommend a quiet hotel near the train station with free breakfast included?",
    "Our quarterly revenue grew by eight percent, driven mostly by subscriptions in Europe.",
    "I forgot my password again and the reset email never shows up in my inbox.",
    "The new firmware update drains the battery much faster than the previous version did.",
    "Please cancel my order because I found the same jacket cheaper at a local store.",
    "Heavy rain is expected across the northern region for the rest of the week.",
    "The onboarding tutorial was clear, but the export feature is hard to find.",
    "Customers in Brazil report that the checkout page fails when they pay with cards.",
    "She trained for six months before running her first marathon in under four hours.",
    "Is it possible to change the shipping address after the order has been confirmed?",
    "The restaurant serves excellent pasta, although the service was slow on Friday night.",
    "We need to migrate the billing database to the new cluster before the end of March.",
    "My flight was overbooked and the airline offered a voucher instead of a refund.",
    "The report shows that most support tickets concern login problems and failed payments.",
    "After the latest update, the app crashes whenever I try to upload a photo.",
    "A gentle introduction to linear algebra for engineers who want to understand neural networks.",
    "The museum opens a new exhibition about ancient trade routes across the Mediterranean next month.",
    "How do I configure two-factor authentication for every account in my organization?",
    "The hotel room was spotless, the staff were friendly, and the view was stunning.",
    "Our team will present the roadmap for the mobile app at the Thursday meeting.",
    "The invoice lists a charge for premium support that we never agreed to pay.",
    "Scientists found that the coral reef recovered faster than expected after the storm.",
    "I would like to upgrade my plan, but the pricing page does not load.",
    "The laptop keyboard feels great, yet the trackpad sometimes ignores light taps.",
    "Traffic on the main bridge will be closed overnight for maintenance work this weekend.",
    "Please send me a summary of the contract terms before we sign on Monday.",
    "The recipe calls for fresh basil, ripe tomatoes, garlic, and a splash of olive oil.",
    "Why does the dashboard show different numbers than the exported spreadsheet for last month?",
    "The city council approved a plan to add protected bike lanes on five major streets.",
    "My package tracking has not updated in a week and nobody answers the phone.",
    "The conference keynote focused on privacy, open standards, and responsible use of data.",
    "We are hiring a backend engineer with experience in distributed systems and Python.",
    "The printer keeps jamming on double-sided jobs even after we replaced the rollers.",
    "Local farmers expect a smaller harvest this year because of the long dry summer.",
    "Could you explain why my electricity bill doubled although our usage stayed the same?",
    "The documentation is thorough, but a few code samples use deprecated function names.",
    "Two new species of frogs were discovered in the rainforest during the spring survey.",
    "I love how quickly the support team resolved my issue with the broken charger.",
    "The training course covers negotiation, giving feedback, and running effective meetings.",
)


# --- results --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    key: str
    label: str
    unit: str
    rate: float
    p50_ms: float
    p99_ms: float
    completed: int
    seconds: float
    mean_batch: float | None = None


@dataclass
class Ratio:
    label: str
    numerator: str
    denominator: str
    value: float
    target: float | None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the load loop (shared by the client worker and the driver-side plain-Serve runs) --------------------


@dataclass
class LoadStats:
    completed: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)


async def drive(
    call: Callable[[int], Awaitable[object]], concurrency: int, warmup_s: float, duration_s: float
) -> LoadStats:
    """``concurrency`` closed-loop callers; counts completions inside the window after the warm-up."""
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    done: list[tuple[float, float]] = []

    async def caller(index: int) -> None:
        while (sent := time.perf_counter()) < end:
            await call(index)
            index += concurrency
            finished = time.perf_counter()
            done.append((finished, finished - sent))

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    window = [latency for finished, latency in done if start <= finished <= end]
    return LoadStats(completed=len(window), seconds=duration_s, latencies_s=window)


def measurement(key: str, label: str, unit: str, stats: LoadStats, items_per_call: int = 1) -> Measurement:
    lat_ms = [s * 1000 for s in stats.latencies_s]
    return Measurement(
        key=key,
        label=label,
        unit=unit,
        rate=stats.completed * items_per_call / stats.seconds,
        p50_ms=percentile(lat_ms, 0.50),
        p99_ms=percentile(lat_ms, 0.99),
        completed=stats.completed,
        seconds=stats.seconds,
    )


# --- worker subprocesses: a gRPC load client, the raw model ---------------------------------------------


async def load_worker(job: dict[str, Any]) -> LoadStats:
    from serving.client import AsyncClient

    async with AsyncClient(job["target"], job["api_key"]) as client:

        async def call(index: int) -> None:
            await client.embed([SENTENCES[index % len(SENTENCES)]], model=job["model"])

        return await drive(call, job["concurrency"], job["warmup_s"], job["duration_s"])


def raw_worker(job: dict[str, Any]) -> LoadStats:
    """The model alone, in this process: batches of ``batch`` texts, ``threads`` torch threads."""
    import torch

    from serving.models.embed import EmbedRunner

    torch.set_num_threads(job["threads"])
    runner = EmbedRunner(max_input_tokens=256)
    runner.setup(Path(job["model_dir"]), "cpu", "float32")
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
    job = json.loads(raw_job)
    stats = asyncio.run(load_worker(job)) if job["kind"] == "load" else raw_worker(job)
    print("RESULT " + json.dumps(asdict(stats)), flush=True)


async def spawn_worker(job: dict[str, Any]) -> LoadStats:
    env = {**os.environ, **RAY_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
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


# --- plain Ray Serve, as its docs show (option C) -------------------------------------------------------


class PlainBatched:
    """One deployment, ``@serve.batch``, the model called inline; one handle call per request."""

    def __init__(self, model_dir: str, noop: bool) -> None:
        import torch

        from serving.models.embed import EmbedRunner
        from serving.models.noop import NoopRunner

        torch.set_num_threads(1)
        self.runner: EmbedRunner | NoopRunner = NoopRunner() if noop else EmbedRunner(max_input_tokens=256)
        self.runner.setup(Path(model_dir), "cpu", "float32")
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=PLAIN_MAX_BATCH, batch_wait_timeout_s=PLAIN_WAIT_S)
    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.batches += 1
        self.items += len(texts)
        return self.runner.predict(texts)

    def batch_stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items}


def deploy_plain(name: str, model_dir: Path, noop: bool, num_cpus: float) -> Any:
    app = (
        serve.deployment(PlainBatched)
        .options(  # type: ignore[attr-defined]
            name=name,
            ray_actor_options={"num_cpus": num_cpus},
            # Serve's default (5) would cap every batch at 5; its batching guide says to raise it.
            max_ongoing_requests=2 * PLAIN_MAX_BATCH,
        )
        .bind(str(model_dir), noop)
    )
    return serve.run(app, name=f"{APP_PREFIX}-{name}", route_prefix=None)


# --- the stack ------------------------------------------------------------------------------------------


def toml_table(values: dict[str, Any]) -> str:
    parts = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "{ " + ", ".join(parts) + " }"


def write_registry(path: Path) -> Path:
    """minilm-l6 exactly as the default registry has it, plus the no-op model over the same package."""
    from serving.models.registry import load_registry

    minilm = next(spec for spec in load_registry() if spec.id == EMBED_MODEL)
    source = toml_table(asdict(minilm.source))
    path.write_text(
        f"""[[models]]
id = "{EMBED_MODEL}"
task = "embed"
source = {source}
device = "{minilm.device}"
dtype = "{minilm.dtype}"
max_input_tokens = {minilm.max_input_tokens}
batching = {toml_table(asdict(minilm.batching))}
replicas = {toml_table(asdict(minilm.replicas))}

[[models]]
id = "{NOOP_MODEL}"
task = "embed"
runner = "noop"
source = {source}
batching = {{ max_batch_size = 256, max_wait_ms = 5 }}
replicas = {{ num_replicas = 1, num_cpus = 0.25, torch_threads = 1 }}
"""
    )
    return path


def echo_payload() -> bytes:
    """A response the size of the gateway's answer to a one-text MiniLM request (384 floats, usage, id)."""
    from serving.domain import EmbedResult, Usage
    from serving.gateway import convert

    result = EmbedResult(EMBED_MODEL, [[0.01 * i for i in range(384)]], Usage(16, 0), "0" * 32)
    return bytes(convert.embed_response(result).SerializeToString())


async def start_echo_server(payload: bytes) -> tuple[grpc.aio.Server, int]:
    """A bare grpc.aio server answering the Embed method with fixed bytes, so AsyncClient can call it."""

    async def embed(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "serving.v1.InferenceService", {"Embed": grpc.unary_unary_rpc_method_handler(embed)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@dataclass
class Stack:
    tmp: Path
    settings: Any
    specs: list[Any]
    handles: dict[str, Any]
    plain: dict[str, Any]
    model_dir: Path


def start_stack(tmp: Path) -> Stack:
    import ray

    from serving.models.deployment import deploy_models
    from serving.models.registry import load_registry
    from serving.models.sources import resolve_model_dir
    from serving.settings import Settings

    registry = write_registry(tmp / "registry.toml")
    settings = Settings(
        data_dir=tmp,
        model_registry=registry,
        model_cache_dir=CACHE_DIR,
        grpc_port=0,
        http_port=0,
        shutdown_grace_s=1.0,
    ).validate()
    specs = load_registry(registry)
    model_dir = resolve_model_dir(specs[0], CACHE_DIR)
    # address="local": never attach to another Ray instance running on this machine.
    ray.init(
        address="local",
        include_dashboard=False,
        runtime_env={"env_vars": RAY_ENV},
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    serve.start(proxy_location="Disabled")
    handles = deploy_models(specs, CACHE_DIR, APP_PREFIX)
    plain = {
        NOOP_MODEL: deploy_plain("plain-noop", model_dir, noop=True, num_cpus=0.25),
        EMBED_MODEL: deploy_plain("plain-minilm", model_dir, noop=False, num_cpus=0.5),
    }
    return Stack(tmp, settings, specs, handles, plain, model_dir)


def describe_batching(stack: Stack) -> str:
    gateway = stack.settings.batching
    replicas = ", ".join(
        f"{spec.id} {spec.batching.max_batch_size}/{spec.batching.max_wait_ms:g} ms" for spec in stack.specs
    )
    return (
        f"batching: gateway micro-batch {gateway.max_batch_size}/{gateway.max_wait_ms:g} ms; "
        f"stack replicas @serve.batch {replicas}; plain Serve @serve.batch {PLAIN_MAX_BATCH}/{PLAIN_WAIT_S * 1000:g} ms"
    )


def stop_stack() -> None:
    import ray

    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


# --- the measurements -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    concurrency: int
    warmup_s: float
    duration_s: float
    raw_batch: int


async def batch_totals(handle: Any) -> tuple[int, int]:
    snap = await handle.batch_stats.remote()
    return int(snap["batches"]), int(snap["items"])


async def with_batch_stats(handle: Any, run: Awaitable[Measurement]) -> Measurement:
    before = await batch_totals(handle)
    result = await run
    after = await batch_totals(handle)
    batches = after[0] - before[0]
    result.mean_batch = (after[1] - before[1]) / batches if batches else None
    return result


async def grpc_run(key: str, label: str, unit: str, target: str, api_key: str, model: str, cfg: Config) -> Measurement:
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


async def raw_run(key: str, model_dir: Path, threads: int, batch: int, cfg: Config) -> Measurement:
    job = {
        "kind": "raw",
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


async def plain_run(key: str, label: str, handle: Any, cfg: Config) -> Measurement:
    async def call(index: int) -> None:
        await handle.remote(SENTENCES[index % len(SENTENCES)])

    stats = await drive(call, cfg.concurrency, cfg.warmup_s, cfg.duration_s)
    return measurement(key, label, "req/s", stats)


def open_store(path: Path) -> Any:
    """The partner store over a SQLite file (given as a ``Database`` handle once ``serving.storage`` exists)."""
    from serving.partners import store

    store_cls: Any = store.PartnerStore
    try:
        from serving.storage.database import Database
    except ImportError:
        return store_cls(path)
    return store_cls(Database(str(path)))


def bench_api_key(store: Any) -> str:
    """A key for a partner whose plan has no limits: the benchmark measures overhead, not quota."""
    try:
        from serving.plans import Plan
    except ImportError:  # a stack without plans: every partner is unlimited
        return str(store.issue_key(store.create_partner("bench").id))
    store.put_plan(Plan(name="bench-unlimited"))  # zero means unlimited for every numeric limit
    return str(store.issue_key(store.create_partner("bench", plan="bench-unlimited").id))


@dataclass(frozen=True)
class Targets:
    api_key: str
    stack: str  # the gateway as configured (micro-batching on)
    unbatched: str  # the same gateway code with micro-batching off (cap 1): one handle call per request
    echo: str


def build_plan(stack: Stack, t: Targets, cfg: Config) -> list[Callable[[], Awaitable[Measurement]]]:
    """Every measurement, baselines interleaved with the rows they divide."""
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
        lambda: raw_run("raw-1t-b64", stack.model_dir, 1, 64, cfg),
        lambda: through("A0", "A0: MiniLM, stack with gateway micro-batch off", "texts/s", t.unbatched, EMBED_MODEL),
        lambda: through("B0", "B0: no-op, stack with gateway micro-batch off", "req/s", t.unbatched, NOOP_MODEL),
        lambda: grpc_run("echo#2", echo_label, "req/s", t.echo, t.api_key, EMBED_MODEL, cfg),
        lambda: raw_run("raw-1t#2", stack.model_dir, 1, cfg.raw_batch, cfg),
    ]


def unbatched_settings(stack: Stack) -> Any:
    """The same settings with gateway micro-batching off, and its own data directory (ledger, journal)."""
    from serving.settings import Batching

    return replace(stack.settings, data_dir=stack.tmp / "unbatched", batching=Batching(max_batch_size=1, max_wait_ms=0))


async def run_plan(plan: list[Callable[[], Awaitable[Measurement]]]) -> list[Measurement]:
    results: list[Measurement] = []
    for step in plan:
        result = await step()
        print(f"  {result.key:<11} {result.rate:9.1f} {result.unit:<8} {result.label}", flush=True)
        results.append(result)
    return results


async def measure_all(stack: Stack, cfg: Config) -> list[Measurement]:
    from serving.gateway.app import Gateway

    store = open_store(stack.tmp / "serving.db")
    gateways = [
        Gateway(stack.settings, stack.specs, stack.handles, store),
        Gateway(unbatched_settings(stack), stack.specs, stack.handles, store),
    ]
    echo: grpc.aio.Server | None = None
    try:
        for gateway in gateways:
            await gateway.start()
        echo, echo_port = await start_echo_server(echo_payload())
        targets = Targets(
            api_key=bench_api_key(store),
            stack=f"127.0.0.1:{gateways[0].grpc_port}",
            unbatched=f"127.0.0.1:{gateways[1].grpc_port}",
            echo=f"127.0.0.1:{echo_port}",
        )
        return await run_plan(build_plan(stack, targets, cfg))
    finally:
        if echo is not None:
            await echo.stop(0)
        await asyncio.gather(*(gateway.stop() for gateway in gateways))
        store.close()


# --- the report -----------------------------------------------------------------------------------------


def mean_of(results: dict[str, Measurement], keys: list[str], key: str, label: str) -> Measurement:
    """A baseline measured twice (interleaved); latencies are not averaged (see the single runs)."""
    runs = [results[k] for k in keys]
    rate = sum(r.rate for r in runs) / len(runs)
    seconds = sum(r.seconds for r in runs)
    return Measurement(
        key, label, runs[0].unit, rate, float("nan"), float("nan"), sum(r.completed for r in runs), seconds
    )


def ratios(results: dict[str, Measurement]) -> list[Ratio]:
    spec = [
        ("A ÷ raw (1 thread)", "A", "raw-1t", 0.8),
        ("A ÷ raw (2 threads)", "A", "raw-2t", 0.8),
        ("A ÷ raw (1 thread, batch 64)", "A", "raw-1t-b64", None),
        ("B ÷ bare grpc.aio", "B", "echo", 0.5),
        ("C(i) plain Serve no-op ÷ bare grpc.aio", "C-i", "echo", None),
        ("C(ii) plain Serve MiniLM ÷ raw (1 thread)", "C-ii", "raw-1t", None),
        ("C(ii) plain Serve MiniLM ÷ raw (2 threads)", "C-ii", "raw-2t", None),
        ("C(i) ÷ B (plain Serve vs stack, no-op)", "C-i", "B", None),
        ("C(ii) ÷ A (plain Serve vs stack, MiniLM)", "C-ii", "A", None),
        ("A ÷ A0 (what gateway micro-batching buys, MiniLM)", "A", "A0", None),
        ("B ÷ B0 (what gateway micro-batching buys, no-op)", "B", "B0", None),
        ("A0 ÷ raw (1 thread)", "A0", "raw-1t", None),
        ("B0 ÷ bare grpc.aio", "B0", "echo", None),
    ]
    return [Ratio(label, num, den, results[num].rate / results[den].rate, target) for label, num, den, target in spec]


def noise_notes(results: dict[str, Measurement]) -> list[str]:
    """What in this run makes its ratios less trustworthy (the machine is shared and has 2 cores)."""
    notes = []
    for a, b in (("echo#1", "echo#2"), ("raw-1t#1", "raw-1t#2")):
        drift = abs(results[a].rate - results[b].rate) / max(results[a].rate, results[b].rate)
        if drift > 0.15:
            notes.append(f"{a} and {b} differ by {drift:.0%}: the CPU was not steady during this run")
    if results["raw-2t"].rate < results["raw-1t"].rate:
        notes.append(
            "the 2-thread raw baseline ran slower than the 1-thread one: the second core was busy (other work),"
            " so ratios against raw-2t overstate the stack"
        )
    return notes


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def measurement_table(rows: list[Measurement]) -> str:
    lines = [
        "| key | measurement | rate | unit | p50 ms | p99 ms | mean replica batch |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.key, r.label, f"{r.rate:.1f}", r.unit, fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.mean_batch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[Ratio]) -> str:
    lines = ["| ratio | value | target | verdict |", "|---|---:|---:|---|"]
    for r in rows:
        verdict = "-" if r.target is None else ("meets" if r.value >= r.target else "BELOW target")
        target = "-" if r.target is None else f"≥ {r.target}"
        lines.append(f"| {r.label} | {r.value:.2f} | {target} | {verdict} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu_model": model, "loadavg_1m": os.getloadavg()[0]}


def report(measured: list[Measurement], cfg: Config, note: str, before: dict[str, Any], json_path: Path | None) -> None:
    results = {m.key: m for m in measured}
    results["echo"] = mean_of(results, ["echo#1", "echo#2"], "echo", "bare grpc.aio baseline (mean of 2 runs)")
    results["raw-1t"] = mean_of(results, ["raw-1t#1", "raw-1t#2"], "raw-1t", "raw 1-thread baseline (mean of 2 runs)")
    table = ratios(results)
    baselines = [results["echo"], results["raw-1t"]]
    after = machine()
    print()
    print(
        f"machine: {before['cpus']} CPUs, {before['cpu_model']}; load average (1 min) "
        f"{before['loadavg_1m']:.2f} before, {after['loadavg_1m']:.2f} after"
    )
    print(
        f"concurrency {cfg.concurrency}, warm-up {cfg.warmup_s:g} s + {cfg.duration_s:g} s measured per row; "
        f"raw baseline batch {cfg.raw_batch}"
    )
    print(note)
    print()
    print(measurement_table(measured))
    print()
    for base in baselines:
        print(f"{base.label}: {base.rate:.1f} {base.unit}")
    print()
    print(ratio_table(table))
    notes = noise_notes(results)
    for note_line in notes:
        print(f"note: {note_line}")
    if json_path is not None:
        payload = {
            "machine": {"before": before, "after": after},
            "config": {**asdict(cfg), "batching": note},
            "measurements": [asdict(m) for m in measured],
            "baselines": [asdict(m) for m in baselines],
            "ratios": [asdict(r) for r in table],
            "notes": notes,
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {json_path}")


# --- entry point ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each measurement")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per row")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def gateway_batch_cap() -> int:
    from serving.settings import Settings

    return Settings().batching.max_batch_size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The raw baseline encodes batches of the gateway's micro-batch cap: the largest batch the stack forms.
    cfg = Config(args.concurrency, args.warmup, args.duration, raw_batch=min(args.concurrency, gateway_batch_cap()))
    before = machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        print("starting Ray and deploying the models...", flush=True)
        started = time.perf_counter()
        try:
            stack = start_stack(Path(tmp))
            note = describe_batching(stack)
            print(f"deployed in {time.perf_counter() - started:.0f} s; {note}", flush=True)
            measured = asyncio.run(measure_all(stack, cfg))
        finally:
            stop_stack()
    report(measured, cfg, note, before, args.json)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
