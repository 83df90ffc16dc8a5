"""Gateways on every core (``--workers N``): N gateway processes share the partner ports through SO_REUSEPORT, each
with its own ops port and journal, quota shared in Redis; a supervisor starts and stops them together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from conftest import REDIS_URL
from gateway_process import start_gateway_process
from prometheus_client.parser import text_string_to_metric_families

from serving.gateway.workers import PortInUse, Supervisor, WorkerSpec, reserve_port, worker_ops_ports
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import AsyncClient

# A stand-in worker: ready at once, drains on SIGTERM, stops on stdin EOF (its supervisor died).
_FAKE_WORKER = """
import json, signal, sys
def stop(*_):
    print("DRAINED", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("READY " + json.dumps({"grpc_port": 1, "http_port": 2, "ops_port": int(sys.argv[1])}), flush=True)
sys.stdin.read()
"""


def _fake_workers(count: int) -> list[WorkerSpec]:
    return [
        WorkerSpec(f"fake-w{i}", [sys.executable, "-c", _FAKE_WORKER, str(9000 + i)], dict(os.environ))
        for i in range(count)
    ]


async def _partner_requests(ops_port: int, partner_id: str) -> float:
    """This worker's ``serving_partner_requests_total`` for the partner, summed over its labels."""
    async with httpx.AsyncClient() as http:
        page = (await http.get(f"http://127.0.0.1:{ops_port}/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "serving_partner_requests_total" and sample.labels.get("partner") == partner_id
    )


async def _embed_grpc(target: str, key: str, text: str) -> None:
    async with AsyncClient(target, key) as client:  # a channel of its own: a new connection, to either worker
        assert len((await client.embed([text])).embeddings[0]) == 384


async def _embed_http(base: str, key: str, text: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:  # a new connection each time
        reply = await http.post(
            "/v1/embed",
            json={"model": "minilm-l6", "texts": [text]},
            headers={"authorization": f"Bearer {key}"},
        )
        assert reply.status_code == 200, reply.text


async def test_two_workers_share_the_partner_ports_and_count_every_request_once(
    settings: Settings, ray_models: dict[str, Any], store: PartnerStore
) -> None:
    partner = store.create_partner(f"workers-{uuid.uuid4().hex[:6]}", plan="unlimited")
    key = store.issue_key(partner.id)
    gateway_id = f"workers-{uuid.uuid4().hex[:6]}"
    process, ports = await start_gateway_process(
        settings,
        SERVING_WORKERS="2",
        SERVING_REDIS_URL=REDIS_URL,
        SERVING_GATEWAY_ID=gateway_id,
        SERVING_FINAL_SCRAPE_WAIT_S="0",  # this test scrapes the workers; they need not wait for one more
    )
    ops_ports = cast(list[int], ports["ops_ports"])
    assert len(set(ops_ports)) == 2 and ports["ops_port"] == ops_ports[0]
    target, base = f"127.0.0.1:{ports['grpc_port']}", f"http://127.0.0.1:{ports['http_port']}"
    # One journal per worker: distinct gateway ids, none under the undecorated id.
    journals = settings.data_dir / "journal"
    assert (journals / f"{gateway_id}-w0").is_dir() and (journals / f"{gateway_id}-w1").is_dir()
    assert not (journals / gateway_id).exists()

    # The kernel spreads connections, not requests, and by a hash: send rounds of fresh connections until both
    # workers have served some (40 requests at least, bounded).
    sent, counts = 0, [0.0, 0.0]
    while sent < 40 or (min(counts) == 0 and sent < 200):
        calls = [_embed_grpc(target, key, f"worker spread {sent + i}") for i in range(5)]
        calls += [_embed_http(base, key, f"worker spread {sent + 5 + i}") for i in range(5)]
        await asyncio.gather(*calls)
        sent += len(calls)
        counts = [await _partner_requests(port, partner.id) for port in ops_ports]
    print(f"{sent} requests; served per worker: {counts}")
    assert min(counts) > 0, counts
    assert sum(counts) == sent

    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0
    ledger = Database(settings.ledger_db_url)
    try:
        [(stored,)] = ledger.query("SELECT COUNT(*) FROM usage_records WHERE partner_id = ?", (partner.id,))
    finally:
        ledger.close()
    assert stored == sent  # both workers drained and stored every record before the supervisor exited


@pytest.mark.parametrize("command", ["run", "gateway"])
async def test_workers_without_redis_refuse_to_start(command: str, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "SERVING_REDIS_URL"}
    data_dir = tmp_path / "data"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "serving.cli", "--data-dir", str(data_dir), command, "--workers", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert b"SERVING_REDIS_URL" in err
    assert not data_dir.exists()  # nothing started


async def test_supervisor_forwards_the_stop_to_every_worker() -> None:
    supervisor, stop = Supervisor(_fake_workers(2)), asyncio.Event()
    ready = await supervisor.start(stop)
    assert ready is not None and [r["ops_port"] for r in ready] == [9000, 9001]
    stop.set()
    await supervisor.run_until(stop)
    supervisor.terminate()
    await supervisor.drained(30)
    assert await supervisor.wait(30) == 0
    assert supervisor.exit_codes == [0, 0] and not supervisor.failed


async def test_a_worker_that_dies_stops_the_rest_with_a_failure() -> None:
    supervisor, stop = Supervisor(_fake_workers(2)), asyncio.Event()
    assert await supervisor.start(stop) is not None
    os.kill(supervisor.pids[1], signal.SIGKILL)
    await supervisor.run_until(stop)  # returns on the exit, not on the stop event
    assert supervisor.failed and not stop.is_set()
    supervisor.terminate()
    await supervisor.drained(30)
    assert await supervisor.wait(30) == 1
    assert supervisor.exit_codes == [0, -signal.SIGKILL]  # the survivor drained and stopped cleanly


def test_a_reserved_port_is_shared_by_reuse_port_listeners_only() -> None:
    with reserve_port("127.0.0.1", 0) as reserved:
        port = reserved.getsockname()[1]
        with (
            socket.create_server(("127.0.0.1", port), reuse_port=True) as first,
            socket.create_server(("127.0.0.1", port), reuse_port=True) as second,
        ):
            assert first.getsockname()[1] == second.getsockname()[1] == port
            # A listener on the port makes it "in use" for another set of workers, SO_REUSEPORT or not.
            with pytest.raises(PortInUse):
                reserve_port("127.0.0.1", port)
        with pytest.raises(OSError):
            socket.create_server(("127.0.0.1", port), reuse_port=False)  # without SO_REUSEPORT: refused


def test_each_worker_gets_its_own_ops_port() -> None:
    assert worker_ops_ports(8090, 3) == [8090, 8091, 8092]
    assert worker_ops_ports(0, 3) == [0, 0, 0]
