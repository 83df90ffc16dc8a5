"""Helpers for the billing end-to-end tests: a real Prometheus server, condition waits, small HTTP servers
that misbehave on purpose (a broken /metrics page, a proxy that fails before it forwards)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
POLL_S = 0.05


async def wait_until(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Polls ``check`` until it returns a value that is not None (nor False); the event loop keeps running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await loop.run_in_executor(None, threading.Event().wait, POLL_S)  # a pause that never blocks the loop


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrometheusServer:
    url: str
    targets_file: Path
    process: subprocess.Popen[bytes]

    def set_targets(self, targets: dict[str, str]) -> None:
        """``{instance label: "host:port"}``; the instance label stays when a gateway restarts on a new port."""
        groups = [{"targets": [address], "labels": {"instance": name}} for name, address in sorted(targets.items())]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    async def values(self, promql: str, by: str) -> dict[str, float]:
        return {item["metric"].get(by, ""): float(item["value"][1]) for item in await self.query(promql)}


@contextmanager
def prometheus_server(job: str = "gateway") -> Iterator[PrometheusServer]:
    """A real Prometheus (Debian's ``prometheus``) on a free port with its own data dir, scraping every 1 s
    the targets of a file_sd file; ready when ``/-/ready`` answers 200."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: scripts/test-services.sh installs it"
    workdir = Path(tempfile.mkdtemp(prefix="billing-prom-"))
    targets = workdir / "targets.json"
    targets.write_text("[]")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: {job}\n    file_sd_configs:\n"
        f"      - files: ['{targets}']\n        refresh_interval: 1s\n"
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = PrometheusServer(f"http://127.0.0.1:{port}", targets, process)
    try:
        with httpx.Client(timeout=2) as client:
            for _ in range(600):  # up to 30 s
                assert process.poll() is None, (workdir / "prometheus.log").read_text()
                try:
                    if client.get(f"{server.url}/-/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(POLL_S)
            else:
                raise AssertionError("prometheus did not become ready")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def http_server(handle: Callable[[BaseHTTPRequestHandler], tuple[int, str, bytes]]) -> Iterator[str]:
    """A tiny threaded HTTP server on a free port answering GETs with ``handle``; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, content_type, body = handle(self)
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def failing_proxy(upstream: str, failures: int, status: int = 503) -> Iterator[tuple[str, list[int]]]:
    """Answers the first ``failures`` requests with ``status`` (or, for 200, a Prometheus error body), then
    forwards to ``upstream``. Yields the base URL and a list of the statuses it answered."""
    answered: list[int] = []
    lock = threading.Lock()

    def handle(request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        with lock:
            failing = len(answered) < failures
            answered.append(status if failing else 0)
        if failing:
            body = {"status": "error", "errorType": "bad_data" if status == 200 else "unavailable", "error": "injected"}
            return status, "application/json", json.dumps(body).encode()
        forwarded = httpx.get(upstream + request.path, timeout=10)
        return forwarded.status_code, forwarded.headers.get("content-type", "application/json"), forwarded.content

    with http_server(handle) as url:
        yield url, answered
