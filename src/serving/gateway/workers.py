"""Gateways on every core: a supervisor process runs N gateway worker processes on one machine.

The workers share the partner ports (gRPC and HTTP) through SO_REUSEPORT: every worker listens on the same port and
the kernel spreads new *connections* across them (requests on one connection stay with its worker). Each worker is
a whole gateway, a Ray driver attached to the cluster by address, with its own:

- ops listener (``ops_port + i``, or a free port each for 0): /metrics is per process, and a shared port would
  answer each scrape from a random worker;
- usage journal, named ``<SERVING_GATEWAY_ID>-w<i>`` (one writer per journal directory).

Quota and idempotency keys must be shared across the workers, so N > 1 needs Redis (the CLI checks). What stays
per process, like per replica: the fair queue and each model's ``admission.max_concurrency``, so N workers admit
up to N times a model's cap.

A worker is ``serving gateway --worker``: it prints ``READY {ports}`` once serving and ``DRAINED`` once its drain
finished (the supervisor of ``serving run`` stops billing only then, so that billing's exit scrape reads final
counters), and stops by itself if its stdin (a pipe from the supervisor) reaches EOF, i.e. the supervisor died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from serving.settings import Settings

log = logging.getLogger("serving.workers")

READY_PREFIX = "READY "
DRAINED_LINE = "DRAINED"


class PortInUse(OSError):
    """A partner port the workers are to share is taken by another process."""


def worker_gateway_id(gateway_id: str, index: int) -> str:
    return f"{gateway_id}-w{index}"


def worker_ops_ports(first: int, count: int) -> list[int]:
    """Each worker's ops port: ``first``, ``first + 1``, ...; with 0 each worker picks a free one."""
    return [first + i if first else 0 for i in range(count)]


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket on ``(host, port)`` that fixes the port every worker then binds
    (with SO_REUSEPORT too): for port 0 it picks the free port all of them share. Only listening sockets receive
    connections, so the supervisor holding it takes no traffic; holding it keeps the port from other processes
    while the workers start."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if port:
        # A port something listens on must be an error, as it is for one gateway process: with SO_REUSEPORT alone
        # the workers would silently join another multi-worker gateway's port (same user).
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise PortInUse(f"{host}:{port} is in use ({exc.strerror})") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortInUse(f"{host}:{port} is in use ({exc.strerror})") from exc
    return sock


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one worker process."""

    gateway_id: str
    argv: list[str]
    env: dict[str, str]


def worker_specs(
    settings: Settings, ray_address: str, grpc_port: int, http_port: int, ray_temp_dir: str | None = None
) -> list[WorkerSpec]:
    """``serving gateway --worker`` processes on the resolved partner ports. Settings given on the supervisor's
    command line travel as ``SERVING_*`` variables; the rest of the environment is inherited."""
    shared = {**os.environ, "SERVING_WORKERS": "1", "SERVING_DATA_DIR": str(settings.data_dir)}
    if settings.model_registry is not None:
        shared["SERVING_MODEL_REGISTRY"] = str(settings.model_registry)
    if settings.admin_token:  # ``serving run`` generates one when none is configured
        shared["SERVING_ADMIN_TOKEN"] = settings.admin_token
    specs = []
    for index, ops_port in enumerate(worker_ops_ports(settings.ops_port, settings.workers)):
        gateway_id = worker_gateway_id(settings.gateway_id, index)
        argv = [
            sys.executable, "-m", "serving.cli", "gateway", "--worker", "--ray-address", ray_address,
            "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--ops-port", str(ops_port),
        ]  # fmt: skip
        if ray_temp_dir is not None:  # the supervisor's own Ray node (ray_own_node): every worker attaches to it
            argv += ["--ray-temp-dir", ray_temp_dir]
        specs.append(WorkerSpec(gateway_id, argv, {**shared, "SERVING_GATEWAY_ID": gateway_id}))
    return specs


def ready_line(grpc_port: int, http_port: int, ops_ports: list[int]) -> str:
    """The supervisor's readiness line: the one-process keys (``ops_port`` is the first worker's) plus every
    worker's ops port."""
    ports = {"grpc_port": grpc_port, "http_port": http_port, "ops_port": ops_ports[0], "ops_ports": ops_ports}
    return READY_PREFIX + json.dumps(ports)


class _Worker:
    def __init__(self, spec: WorkerSpec, process: asyncio.subprocess.Process, on_exit: asyncio.Event) -> None:
        self.spec = spec
        self.process = process
        self.ready: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self.drained = asyncio.Event()
        self._on_exit = on_exit
        self.exited: asyncio.Task[int] = asyncio.create_task(self._watch())

    async def _watch(self) -> int:
        """Reads the worker's stdout (readiness and drain lines; anything else is passed on) until it exits."""
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(READY_PREFIX) and not self.ready.done():
                self.ready.set_result(json.loads(text[len(READY_PREFIX) :]))  # the worker's own JSON
            elif text == DRAINED_LINE:
                self.drained.set()
            else:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
        code = await self.process.wait()
        if not self.ready.done():
            self.ready.set_result(None)
        self.drained.set()  # nothing left to wait for
        self._on_exit.set()
        return code

    @property
    def running(self) -> bool:
        return not self.exited.done()


class Supervisor:
    """Starts the workers, waits until all are ready, and stops all of them together: on a stop request, or as soon
    as one exits on its own (logged; the supervisor then exits non-zero rather than serve at part capacity)."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self._specs = specs
        self._workers: list[_Worker] = []
        self._exit = asyncio.Event()  # some worker exited
        self._stopping = False
        self.failed = False  # a worker exited before it was told to stop

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    @property
    def exit_codes(self) -> list[int | None]:
        """Each worker's exit code; None while it runs."""
        return [w.exited.result() if w.exited.done() else None for w in self._workers]

    async def start(self, stop: asyncio.Event) -> list[dict[str, Any]] | None:
        """Starts every worker; returns their readiness payloads, in order, once all are ready, or None when
        ``stop`` was set or a worker exited first."""
        for spec in self._specs:
            process = await asyncio.create_subprocess_exec(
                *spec.argv, env=spec.env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self._workers.append(_Worker(spec, process, self._exit))
        all_ready = asyncio.gather(*(w.ready for w in self._workers))
        await self._until(stop, all_ready)
        if all_ready.done() and not self._check_exits(stop):
            return [ready for ready in all_ready.result() if ready is not None]
        all_ready.cancel()
        return None

    async def run_until(self, stop: asyncio.Event) -> None:
        """Returns when ``stop`` is set or a worker exits."""
        await self._until(stop)
        self._check_exits(stop)

    async def _until(self, stop: asyncio.Event, *also: asyncio.Future[Any]) -> None:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._exit.wait())]
        try:
            await asyncio.wait([*waits, *also], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    def _check_exits(self, stop: asyncio.Event) -> bool:
        if self._stopping or stop.is_set():  # Ctrl-C reaches the workers' process group too: they may be stopping
            return False
        for worker in self._workers:
            if not worker.running:
                self.failed = True
                code = worker.exited.result()
                log.error(
                    "gateway worker %s (pid %d) exited with code %s; stopping the other workers",
                    worker.spec.gateway_id, worker.process.pid, code,
                )  # fmt: skip
        return self.failed

    def terminate(self) -> None:
        """SIGTERM to every worker still running: each drains as one gateway does."""
        self._stopping = True
        for worker in self._workers:
            if worker.running:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    async def drained(self, timeout_s: float) -> None:
        """Waits (bounded) until every worker drained or exited."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(w.drained.wait() for w in self._workers))

    async def wait(self, timeout_s: float) -> int:
        """Waits for every worker to exit, killing those still running after ``timeout_s``; returns the supervisor's
        exit code: 0 when every worker stopped cleanly on request, else 1."""
        exits = [w.exited for w in self._workers]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*exits, return_exceptions=True)
        except TimeoutError:
            log.warning("gateway workers still running %.0f s after the stop; killing them", timeout_s)
            for worker in self._workers:
                if worker.running:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.gather(*exits, return_exceptions=True)
        codes = [w.exited.result() for w in self._workers]
        for worker, code in zip(self._workers, codes, strict=True):
            if code != 0 and not self.failed:
                log.error("gateway worker %s exited with code %s while stopping", worker.spec.gateway_id, code)
        return 0 if not self.failed and all(code == 0 for code in codes) else 1
