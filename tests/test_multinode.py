"""The stack across Ray nodes: a head (no CPUs: it schedules no replica, as in the RayService) with GCS fault
tolerance in Redis, a worker node for the models (`ray start` twice, on loopback), and a gateway process attached by
address through a zero-CPU node of its own (SERVING_RAY_OWN_NODE, as the k8s gateway pods run).

- The worker node is SIGKILLed under load: calls fail fast with UNAVAILABLE and a retry delay (never INTERNAL,
  never a timeout), readiness turns false, and usage stays exact; the node starts again and the same gateway serves
  again without a restart.
- The head is SIGKILLed under load and restarted: the gateway keeps serving and stays ready throughout (its handles
  know the replicas; the raylets reconnect to the restarted GCS), and usage stays exact.

Each prints what it measured."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio
import redis
from billing_support import free_port
from conftest import ADMIN_TOKEN, REDIS_URL, ROOT

from serving.partners.store import PartnerStore
from serving.storage.database import Database
from serving_sdk import NO_RETRIES, ApiError, AsyncClient

BIN = Path(sys.executable).parent
CALL_DEADLINE_S = 20.0  # a call that takes this long counts as a hang
CLIENTS = 3
OK_ROWS = "SELECT COUNT(*) FROM usage_records WHERE status = 'ok'"


class Cluster:
    """A Ray head and one worker node on this machine, each its own `ray start --block` process group. The head keeps
    its GCS state in Redis under a namespace of its own (GCS fault tolerance: RayService's gcsFaultToleranceOptions),
    so a restarted head takes the cluster back."""

    def __init__(self, temp_dir: str, env: dict[str, str]) -> None:
        self.temp_dir, self.env, self.port = temp_dir, env, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.namespace = uuid.uuid4().hex  # Ray prefixes its keys with RAY<namespace>@
        self.head = self.start_head()
        self.worker: subprocess.Popen[bytes] | None = None

    def _start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        command = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        return subprocess.Popen(
            [*command, f"--temp-dir={self.temp_dir}", *args],
            env=env or self.env,
            start_new_session=True,  # its own process group: a kill takes the raylet and its workers with it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start_head(self) -> subprocess.Popen[bytes]:
        # A test-only step: on this one machine the other nodes' raylets carry the head's address in their command
        # lines, which `ray start --head` takes for a GCS still running when this file names the same address.
        Path(self.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
        kwargs = self.redis.connection_pool.connection_kwargs
        storage = {
            "RAY_REDIS_ADDRESS": f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}",
            "RAY_external_storage_namespace": self.namespace,
        }
        password = [f"--redis-password={kwargs['password']}"] if kwargs.get("password") else []
        head_args = ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false", *password]
        return self._start(*head_args, env={**self.env, **storage})

    def start_worker(self) -> None:
        # The custom resource exists only here; with no CPUs on the head, every replica must land on this node.
        resources = json.dumps({"model_node": 1})
        self.worker = self._start(f"--address={self.address}", "--num-cpus=2", f"--resources={resources}")

    def kill_worker(self) -> None:
        """SIGKILL to the worker node: its raylet (the one holding the custom resource), every process under it
        (the model replicas, the node's agents) and its `ray start`, as when a machine dies."""
        assert self.worker is not None
        raylets = [
            proc
            for proc in psutil.process_iter(["cmdline"])
            if any("raylet" in part for part in (proc.info["cmdline"] or ())[:1])
            and any("model_node" in part for part in proc.info["cmdline"] or ())
            and any(self.temp_dir in part for part in proc.info["cmdline"] or ())  # this cluster's, not another's
        ]
        assert len(raylets) == 1, f"expected the worker node's raylet, found {len(raylets)}"
        _kill([*raylets, *raylets[0].children(recursive=True)])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def kill_head(self) -> None:
        """SIGKILL to the head node: its GCS, its raylet, the Serve controller and everything else it started."""
        _kill([psutil.Process(self.head.pid), *psutil.Process(self.head.pid).children(recursive=True)])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.head.pid, signal.SIGKILL)
        self.head.wait()

    def stop(self) -> None:
        for process in (self.worker, self.head):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        keys = list(self.redis.scan_iter(match=f"RAY{self.namespace}@*"))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


def _kill(processes: list[psutil.Process]) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(processes, timeout=10)


def _ray_python(cluster: Cluster, code: str) -> str:
    """Runs ``code`` as a driver of the cluster (token auth as the gateway does it) and returns its stdout."""
    prelude = f"from serving.cli import _ray_init; _ray_init(address={cluster.address!r}, namespace='serve')\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], env=cluster.env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _wait_nodes(cluster: Cluster, alive: int) -> None:
    code = "import ray, time\n" + (
        f"while sum(n['Alive'] for n in ray.nodes()) != {alive}: time.sleep(0.5)\n"  # readiness, not a fixed wait
    )
    _ray_python(cluster, code)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's head turns token auth on; a joining node must use the local token
    # As KubeRay sets for its workers under GCS fault tolerance (and the k8s gateway pods): raylets and drivers wait
    # this long for a restarted GCS instead of Ray's 60 s, which a head restart on a busy machine can exceed.
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "600"
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(temp_dir, env)
    try:
        cluster.start_worker()
        _wait_nodes(cluster, alive=2)
        _ray_python(
            cluster,
            "from pathlib import Path\n"
            "from dataclasses import replace\n"
            "from ray import serve\n"
            "from serving.models.registry import load_registry\n"
            "from serving.models.deployment import deploy_models\n"
            "serve.start(proxy_location='Disabled')\n"
            "specs = [s for s in load_registry(None) if s.id == 'minilm-l6']\n"
            f"deploy_models(specs, Path({str(ROOT / '.cache' / 'models')!r}), 'mn')\n",
        )
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(cluster: Cluster, tmp_path: Path) -> AsyncIterator[tuple[dict[str, int], str, Database]]:
    """`serving gateway --ray-address` for the embedding model; a partner to call it with."""
    registry = tmp_path / "registry.toml"
    source = (ROOT / "src" / "serving" / "models" / "default.toml").read_text()
    registry.write_text("[[models]]\n" + source.split("\n[[models]]\n")[1])  # the first model: minilm-l6
    store = PartnerStore(Database(str(tmp_path / "serving.db")))
    partner = store.create_partner("multinode", plan="unlimited")
    key = store.issue_key(partner.id)
    store.close()
    env = {
        **cluster.env,
        "SERVING_DATA_DIR": str(tmp_path),
        "SERVING_SERVE_APP_NAME": "mn",
        "SERVING_ADMIN_TOKEN": ADMIN_TOKEN,
        "SERVING_MODEL_REGISTRY": str(registry),
        "SERVING_REPLICA_POLL_INTERVAL_S": "1",
        "SERVING_RAY_OWN_NODE": "1",  # as in k8s: the gateway brings its own raylet, the head's is not its own
    }
    command = [str(BIN / "serving"), "gateway", "--ray-address", cluster.address]
    ports_args = ["--grpc-port", "0", "--http-port", "0", "--ops-port", "0"]
    process = await asyncio.create_subprocess_exec(*command, *ports_args, env=env, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    ports: dict[str, int] = {}
    while line := await process.stdout.readline():
        if line.startswith(b"READY "):
            ports = json.loads(line[6:])
            break
    assert ports, f"the gateway exited before it was ready (code {await process.wait()})"
    ledger = Database(str(tmp_path / "ledger.db"))
    try:
        yield ports, key, ledger
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 90)
        ledger.close()


async def _ready(ops: int) -> bool:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{ops}/readyz")).status_code == 200


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 300.0) -> float:
    """Seconds until ``check()`` holds. It reads another process's state, which has nothing to await: polled."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.25)
    return time.monotonic() - started


class Outcomes:
    """Every call's outcome, as ``phase:code``; waiters wake on each new one."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, float]] = []  # (started, phase:code, seconds the call took)
        self.phase = "before"
        self._changed = asyncio.Condition()

    async def add(self, started: float, code: str) -> None:
        async with self._changed:
            self.calls.append((started, f"{self.phase}:{code}", time.monotonic() - started))
            self._changed.notify_all()

    def count(self, outcome: str) -> int:
        return sum(1 for _, seen, _ in self.calls if seen == outcome)

    def codes(self) -> Counter[str]:
        return Counter(seen for _, seen, _ in self.calls)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)


def _start_clients(port: int, key: str, outcomes: Outcomes, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """CLIENTS partners' backends calling embed in a loop through the SDK, without retries, until ``stop``."""

    async def client(index: int) -> None:
        async with AsyncClient(f"127.0.0.1:{port}", key, retry=NO_RETRIES, timeout_s=CALL_DEADLINE_S) as sdk:
            for n in itertools.count():
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    await sdk.embed([f"client {index} call {n}"])
                    code = "ok"
                except ApiError as exc:
                    code = exc.code
                    assert code != "UNAVAILABLE" or exc.retry_after_s, "UNAVAILABLE must say when to retry"
                await outcomes.add(started, code)
                if code != "ok":  # a client backs off as told, instead of spinning
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)

    return [asyncio.create_task(client(i)) for i in range(CLIENTS)]


async def _usage_report(outcomes: Outcomes, ledger: Database, **measured: float) -> dict[str, object]:
    """What the calls saw and what the ledger holds; asserts every served call was billed once, failures never."""
    codes = outcomes.codes()
    served = sum(n for seen, n in codes.items() if seen.endswith(":ok"))
    ledger_rows = await _ledger_rows_when_flushed(ledger, served)
    report = {
        "calls": len(outcomes.calls),
        "by_phase_and_code": dict(sorted(codes.items())),
        **{name: round(value, 1) for name, value in measured.items()},
        "slowest_call_s": round(max(took for _, _, took in outcomes.calls), 2),
        "served": served,
        "ledger_rows": ledger_rows,
    }
    assert ledger_rows == served  # every served call billed once
    unbilled = ledger.query("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0) FROM usage_records WHERE status <> 'ok'")
    assert int(unbilled[0][1]) == 0  # a call that failed was billed nothing
    return report


async def test_losing_the_model_node_fails_fast_and_recovers(
    cluster: Cluster, gateway: tuple[dict[str, int], str, Database]
) -> None:
    ports, key, ledger = gateway
    outcomes = Outcomes()
    stop = asyncio.Event()
    tasks = _start_clients(ports["grpc_port"], key, outcomes, stop)
    await outcomes.wait_for(lambda: outcomes.count("before:ok") >= 30)
    assert await _ready(ports["ops_port"])

    outcomes.phase = "outage"
    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill_worker)
    unready_after_s = await _until(lambda: _not_ready(ports["ops_port"]))
    refused = ("outage:UNAVAILABLE", "outage:INTERNAL", "outage:DEADLINE_EXCEEDED", "outage:UNKNOWN")
    await outcomes.wait_for(lambda: sum(outcomes.codes()[seen] for seen in refused) >= 10)
    outage_s = time.monotonic() - killed_at

    outcomes.phase = "recovery"
    restarted_at = time.monotonic()
    await asyncio.to_thread(cluster.start_worker)
    await outcomes.wait_for(lambda: outcomes.count("recovery:ok") >= 1)
    recovered_after_s = time.monotonic() - restarted_at
    await _until(lambda: _ready(ports["ops_port"]))
    stop.set()
    await asyncio.gather(*tasks)

    report = await _usage_report(
        outcomes,
        ledger,
        readiness_false_after_kill_s=unready_after_s,
        outage_observed_s=outage_s,
        first_ok_after_restart_s=recovered_after_s,
    )
    print("\nmulti-node, worker node lost:", json.dumps(report))
    codes = outcomes.codes()
    failures = {seen.split(":", 1)[1] for seen in codes if not seen.endswith(":ok")}
    assert failures <= {"UNAVAILABLE"}, codes  # never INTERNAL, never DEADLINE_EXCEEDED
    assert max(took for _, _, took in outcomes.calls) < CALL_DEADLINE_S


async def test_a_head_restart_does_not_cut_the_gateway(
    cluster: Cluster, gateway: tuple[dict[str, int], str, Database]
) -> None:
    """GCS fault tolerance as the RayService configures it: the head (GCS, Serve controller, the head's raylet) is
    SIGKILLed under load and started again. Every call succeeds, readiness never drops, the Serve controller comes
    back with the application RUNNING, and the same gateway keeps serving after it."""
    ports, key, ledger = gateway
    outcomes = Outcomes()
    stop = asyncio.Event()
    tasks = _start_clients(ports["grpc_port"], key, outcomes, stop)
    await outcomes.wait_for(lambda: outcomes.count("before:ok") >= 30)

    outcomes.phase = "head_down"
    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill_head)
    probes: Counter[int] = Counter()  # /readyz answers while the head is down
    head_back = asyncio.Event()

    async def probe() -> None:  # as the kubelet does, every 0.2 s
        async with httpx.AsyncClient() as http:
            while not head_back.is_set():
                probes[(await http.get(f"http://127.0.0.1:{ports['ops_port']}/readyz")).status_code] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(head_back.wait(), 0.2)

    prober = asyncio.create_task(probe())
    # Down for at least 25 probes 0.2 s apart (several of the gateway's readiness polls) and 60 calls, well inside
    # the raylets' reconnect timeout.
    await outcomes.wait_for(lambda: outcomes.count("head_down:ok") >= 60 and probes.total() >= 25)
    down_s = time.monotonic() - killed_at

    outcomes.phase = "head_back"
    restarted_at = time.monotonic()
    cluster.head = await asyncio.to_thread(cluster.start_head)
    # The restarted controller recovers the application (DEPLOYING while it re-attaches to the replicas) and then
    # reports it RUNNING: waited for in a driver, as readiness.
    wait_running = (
        "import time\nfrom ray import serve\n"
        "while serve.status().applications['mn-minilm-l6'].status.value != 'RUNNING':\n    time.sleep(0.5)\n"
        "print('STATUS', serve.status().applications['mn-minilm-l6'].status.value)"
    )
    status = await asyncio.to_thread(_ray_python, cluster, wait_running)
    controller_back_s = time.monotonic() - restarted_at
    head_back.set()
    await prober
    seen_after = outcomes.count("head_back:ok")
    await outcomes.wait_for(lambda: outcomes.count("head_back:ok") >= seen_after + 30)
    stop.set()
    await asyncio.gather(*tasks)

    report = await _usage_report(outcomes, ledger, head_down_s=down_s, running_again_after_restart_s=controller_back_s)
    report["readyz_from_kill_until_running"] = dict(probes)
    print("\nmulti-node, head restarted:", json.dumps(report))
    assert set(outcomes.codes()) == {"before:ok", "head_down:ok", "head_back:ok"}, outcomes.codes()
    assert set(probes) == {200}, probes  # never unready: the gateways were not cut
    assert "STATUS RUNNING" in status.splitlines(), status  # Ray's own log lines may share the output
    assert await _ready(ports["ops_port"])


async def _not_ready(ops: int) -> bool:
    return not await _ready(ops)


async def _ledger_rows_when_flushed(ledger: Database, served: int) -> int:
    """The ledger's rows once the gateway's journal reached it (within its flush interval), or after 30 s."""

    async def flushed() -> bool:
        return int(ledger.query(OK_ROWS)[0][0]) >= served

    with contextlib.suppress(TimeoutError):
        await _until(flushed, timeout_s=30.0)
    return int(ledger.query(OK_ROWS)[0][0])
