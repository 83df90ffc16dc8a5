"""PostgreSQL comes back: the database handle, key lookups and the ledger writer reconnect by themselves after
every backend of their database is terminated (what a failover or a server restart does to open connections).

Each test gets a database of its own on the shared server, so terminating "all backends of the database" never
touches another test's connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from conftest import POSTGRES_URL, fresh_postgres_database, running_gateway

from billing.store import BillingStore
from serving.errors import Unavailable, describe
from serving.metering.ledger import Ledger
from serving.metering.record import UsageRecord
from serving.models.registry import ModelSpec
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database, DatabaseUnavailable
from serving_sdk import ApiError, AsyncClient, RetryPolicy

TERMINATE_ALL = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
BOUND = 30.0  # an upper bound on waits that end on an event; never reached when things work


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database of this test's own on the shared server."""
    with fresh_postgres_database("recovery") as url:
        yield url


def terminate_backends(url: str) -> int:
    """Terminates every other session of the database at ``url``; returns how many."""
    with psycopg.connect(url, autocommit=True) as admin:
        return sum(1 for (ok,) in admin.execute(TERMINATE_ALL).fetchall() if ok)


def allow_connections(url: str, allowed: bool) -> None:
    """Takes the database away (no new connections, every open one terminated) or gives it back."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if allowed else 'false'}")
        if not allowed:
            admin.execute(TERMINATE_ALL.replace("current_database()", "%s"), (name,))


def _grow_pool(db: Database, connections: int) -> None:
    """Makes the pool hold ``connections`` open connections (concurrent transactions need one each)."""
    together = threading.Barrier(connections)

    def hold() -> None:
        with db.transaction():
            db.one("SELECT 1")
            together.wait(BOUND)

    with ThreadPoolExecutor(connections) as pool:
        for done in [pool.submit(hold) for _ in range(connections)]:
            done.result(BOUND)


# --- the database handle ---------------------------------------------------------------------------------


def test_database_reconnects_after_its_backends_are_terminated(pg_url: str) -> None:
    db = Database(pg_url)
    db.execute("CREATE TABLE t (id BIGINT PRIMARY KEY)")
    db.execute("CREATE SEQUENCE once")
    _grow_pool(db, 4)
    assert terminate_backends(pg_url) == 4  # every pooled connection is now dead
    # The next calls get fresh connections: no error reaches the caller.
    assert db.execute("INSERT INTO t VALUES (?)", (1,)) == 1
    db.executemany("INSERT INTO t VALUES (?)", [(2,), (3,)])
    assert db.one("SELECT COUNT(*) FROM t") == (3,)

    # Killed inside a transaction: the block fails as Unavailable, nothing of it commits, the next call works.
    with pytest.raises(DatabaseUnavailable) as raised, db.transaction():
        db.execute("INSERT INTO t VALUES (?)", (4,))
        assert terminate_backends(pg_url) >= 1
        db.execute("INSERT INTO t VALUES (?)", (5,))
    assert describe(raised.value).grpc_code == "UNAVAILABLE" and raised.value.retry_after_s == 1.0
    assert db.query("SELECT id FROM t ORDER BY id") == [(1,), (2,), (3,)]

    # A read whose connection dies during the statement is retried once on a fresh connection.
    killing_read = "SELECT CASE WHEN nextval('once') = 1 THEN pg_terminate_backend(pg_backend_pid()) ELSE true END"
    assert db.query(killing_read) == [(True,)]
    assert db.one("SELECT last_value FROM once") == (2,)  # it ran twice: killed once, answered once
    db.close()


def test_database_reports_an_unreachable_server_as_unavailable(pg_url: str) -> None:
    db = Database(pg_url, timeout_s=1.0)
    db.execute("CREATE TABLE t (id BIGINT PRIMARY KEY)")
    allow_connections(pg_url, False)
    try:
        with pytest.raises(DatabaseUnavailable):
            db.one("SELECT COUNT(*) FROM t")
        with pytest.raises(DatabaseUnavailable):
            db.execute("INSERT INTO t VALUES (1)")
    finally:
        allow_connections(pg_url, True)
    for _ in range(int(BOUND)):  # the pool reconnects in the background; each try waits at most timeout_s
        try:
            assert db.execute("INSERT INTO t VALUES (1)") == 1
            break
        except DatabaseUnavailable:
            continue
    assert db.one("SELECT COUNT(*) FROM t") == (1,)
    db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_long_transaction_does_not_block_reads(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An admin transaction that holds its connection (a slow admin query) leaves key lookups running."""
    url = str(tmp_path / "db.sqlite") if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = PartnerStore(Database(url))
    partner = store.create_partner("reader")
    key_id = store.issue_key(partner.id).split("_")[1]
    inside, release = threading.Event(), threading.Event()

    def slow_admin() -> None:
        with store.db.transaction():
            store.db.execute("UPDATE partners SET plan = ? WHERE id = ?", ("free", partner.id))
            inside.set()
            assert release.wait(BOUND)

    with ThreadPoolExecutor(2) as pool:
        admin = pool.submit(slow_admin)
        assert inside.wait(BOUND)
        lookups = [pool.submit(store.key_owner, key_id) for _ in range(3)]
        owners = [lookup.result(BOUND) for lookup in lookups]  # answered while the transaction is still open
        assert not admin.done()
        assert {o.plan.name for o in owners if o is not None} == {"standard"} and None not in owners
        release.set()
        admin.result(BOUND)
    owner = store.key_owner(key_id)
    assert owner is not None and owner.plan.name == "free"
    store.close()


# --- key lookups -----------------------------------------------------------------------------------------


async def test_authenticator_turns_a_database_outage_into_unavailable(pg_url: str) -> None:
    store = PartnerStore(Database(pg_url, timeout_s=1.0))
    partner = store.create_partner("outage")
    known, unknown = store.issue_key(partner.id), store.issue_key(partner.id)
    now = [0.0]
    auth = Authenticator(store, ttl_s=2.0, clock=lambda: now[0])
    assert (await auth.authenticate(known)).partner_id == partner.id
    now[0] = 10.0  # the entry expired: the next call asks the database
    allow_connections(pg_url, False)
    try:
        assert (await auth.authenticate(known)).partner_id == partner.id  # stale if error: a known key passes
        assert auth.stale_answers == 1
        assert (await auth.authenticate(known)).partner_id == partner.id  # database known down: answered at once
        assert auth.stale_answers == 2
        with pytest.raises(Unavailable, match="partner database is unreachable") as raised:
            await auth.authenticate(unknown)  # never seen: nothing to fall back on
        kind = describe(raised.value)
        assert (kind.grpc_code, kind.http_status, raised.value.retry_after_s) == ("UNAVAILABLE", 503, 1.0)
    finally:
        allow_connections(pg_url, True)
    for _ in range(int(BOUND)):  # bounded: each try waits at most the pool timeout (1 s)
        try:
            assert (await auth.authenticate(unknown)).partner_id == partner.id
            break
        except Unavailable:
            continue
    assert (await auth.authenticate(unknown)).partner_id == partner.id
    auth.close()
    store.close()


# --- a full server restart (a private server, so that no other test loses its connections) ---------------


@dataclass
class PrivateServer:
    url: str
    ctl: list[str]  # pg_ctl -D <data dir>, run as the postgres user when we are root
    start_args: list[str]

    def _run(self, *args: str) -> None:
        # The server's own output goes to its log file (-l), never to a pipe this process would wait on.
        subprocess.run([*self.ctl, *args], check=True, stdout=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        self._run("start", "-w", *self.start_args)

    def stop(self) -> None:
        self._run("stop", "-w", "-m", "fast")

    def restart(self) -> None:
        self._run("restart", "-w", "-m", "fast", *self.start_args)


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    """A PostgreSQL server of this module's own (``initdb`` into a temporary directory, on a free port)."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    # scripts/test-services.sh installs Debian's postgresql when no server answers; never skipped in CI.
    assert bindirs and (bindirs[-1] / "initdb").exists(), "install the PostgreSQL server (Debian: postgresql)"
    bindir = bindirs[-1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pg-private-"))
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    data = home / "data"
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
    server = PrivateServer(
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)],
        ["-l", str(home / "server.log"), "-o", options],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _usage(request_id: str, partner_id: str) -> UsageRecord:
    now = time.time()
    return UsageRecord(request_id, partner_id, "k", "minilm-l6", "embed", 3, 0, "ok", 0.1, 2.0, now, now)


async def test_store_ledger_auth_and_billing_recover_after_a_server_restart(
    private_server: PrivateServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real restart: every component keeps its handle (default pool timeout, 5 s) across a restart, and
    across a stop / start with calls made while the server is down."""
    caplog.set_level(logging.INFO, logger="serving.ledger")
    url = private_server.url
    store = PartnerStore(Database(url))
    ledger = Ledger(Database(url), tmp_path / "journal")
    billing = BillingStore(Database(url))
    partner = store.create_partner(f"restart-{uuid.uuid4().hex[:6]}")
    key = store.issue_key(partner.id)
    now = [0.0]
    auth = Authenticator(store, ttl_s=2.0, clock=lambda: now[0])

    def stored() -> int:
        row = ledger.db.one("SELECT COUNT(*) FROM usage_records WHERE partner_id = ?", (partner.id,))
        return int(row[0]) if row else -1

    assert (await auth.authenticate(key)).partner_id == partner.id
    for i in range(10):
        ledger.record(_usage(f"before-{i}", partner.id))
    await asyncio.to_thread(ledger.flush)

    # A restart between calls: the next call of every component simply works.
    await asyncio.to_thread(private_server.restart)
    now[0] = 10.0  # the cached key expired: this lookup goes to the restarted server
    assert (await auth.authenticate(key)).partner_id == partner.id
    assert auth.stale_answers == 0
    await asyncio.to_thread(billing.scrape_failed, "gw", "http://gw/metrics", 1.0, "refused")
    assert [t.source for t in await asyncio.to_thread(billing.targets)] == ["gw"]
    for i in range(10):
        ledger.record(_usage(f"after-restart-{i}", partner.id))
    await asyncio.to_thread(ledger.flush)
    assert await asyncio.to_thread(stored) == 20 and ledger.outages == 0

    # Down for a while: a known key is answered from the cache, records wait in the journal, billing says
    # Unavailable; once the server is back, all of it catches up without a restart of anything here.
    await asyncio.to_thread(private_server.stop)
    try:
        now[0] = 20.0
        assert (await auth.authenticate(key)).partner_id == partner.id
        assert auth.stale_answers == 1
        for i in range(10):
            ledger.record(_usage(f"during-outage-{i}", partner.id))
        with pytest.raises(DatabaseUnavailable):
            await asyncio.to_thread(billing.needing_review)
        await asyncio.to_thread(ledger.in_outage.wait, BOUND)  # until the writer has met the outage
        assert ledger.outages == 1
    finally:
        await asyncio.to_thread(private_server.start)
    await asyncio.to_thread(ledger.flush)  # the writer's retry stores the journaled records
    assert await asyncio.to_thread(stored) == 30
    assert await asyncio.to_thread(billing.needing_review) == 0
    other = await asyncio.to_thread(store.issue_key, partner.id)
    assert (await auth.authenticate(other)).partner_id == partner.id  # never cached: only the database knows it
    now[0] = 30.0
    assert (await auth.authenticate(key)).partner_id == partner.id
    assert auth.stale_answers == 1  # the outage is over: looked up again, not answered from the stale entry
    ledger_logs = [r.msg for r in caplog.records if r.name == "serving.ledger"]
    assert sum(m.startswith("ledger write failed") for m in ledger_logs) == 1  # one line for the whole outage
    assert sum(m.startswith("ledger writes resumed") for m in ledger_logs) == 1
    auth.close()
    ledger.close()
    ledger.db.close()
    billing.close()
    store.close()


# --- the whole gateway under load ------------------------------------------------------------------------


async def test_gateway_under_load_survives_terminated_backends_and_an_outage(
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Partners, keys and the ledger in PostgreSQL; six clients send embeddings (four over gRPC with their own
    request ids, two over HTTP without) with a 0.05 s auth cache, so key lookups hit the database after every
    kill. All backends are terminated five times, then the database refuses connections for a while (until the
    ledger writer has failed at least once), then it is back."""
    caplog.set_level(logging.INFO, logger="serving.ledger")
    store = PartnerStore(Database(pg_url))
    partner = store.create_partner("pg-recovery", plan="unlimited")
    key = store.issue_key(partner.id)
    overrides = {"database_url": pg_url, "ledger_database_url": pg_url, "gateway_id": "pg-recovery"}
    kills, per_phase = 5, 30
    acknowledged: dict[str, int] = {}
    by_grpc = [0]  # acknowledged over gRPC (with a client request id)
    failed: dict[str, str] = {}  # request id -> gRPC code or HTTP status
    progress = asyncio.Condition()
    stop = asyncio.Event()

    async def acknowledge(request_id: str, tokens: int) -> None:
        acknowledged[request_id] = tokens
        async with progress:
            progress.notify_all()

    async def grpc_worker(target: str, n: int) -> None:
        async with AsyncClient(target, key, retry=RetryPolicy(attempts=1)) as client:
            while not stop.is_set():
                request_id = f"g{n}-{uuid.uuid4().hex}"
                try:
                    result = await client.embed([f"grpc {n} {request_id[-6:]}"], request_id=request_id)
                except ApiError as exc:
                    failed[request_id] = exc.code
                    continue
                by_grpc[0] += 1
                await acknowledge(request_id, result.usage.input_tokens)

    async def http_worker(base: str, n: int) -> None:
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=BOUND) as client:
            while not stop.is_set():
                body = {"model": "minilm-l6", "texts": [f"http {n} {uuid.uuid4().hex[:6]}"]}
                reply = await client.post("/v1/embed", json=body)
                if reply.status_code != 200:
                    failed[f"h{n}-{uuid.uuid4().hex}"] = str(reply.status_code)  # the error body names no id
                    continue
                await acknowledge(reply.json()["request_id"], reply.json()["usage"]["input_tokens"])

    async def reached(count: int, grpc_count: int = 0) -> None:
        async with progress:
            await progress.wait_for(lambda: len(acknowledged) >= count and by_grpc[0] >= grpc_count)

    terminated: list[int] = []
    async with running_gateway(settings, specs, ray_models, store, **overrides, auth_cache_ttl_s=0.05) as gw:
        grpc_target, http_base = f"127.0.0.1:{gw.grpc_port}", f"http://127.0.0.1:{gw.http_port}"
        workers = [asyncio.create_task(grpc_worker(grpc_target, n)) for n in range(4)]
        workers += [asyncio.create_task(http_worker(http_base, n)) for n in range(2)]
        try:
            for round_ in range(1, kills + 1):  # phase 1: terminate every backend, five times
                await asyncio.wait_for(reached(round_ * per_phase), BOUND)
                terminated.append(await asyncio.to_thread(terminate_backends, pg_url))
            await asyncio.wait_for(reached(len(acknowledged) + per_phase), BOUND)
            before_outage = len(acknowledged)
            await asyncio.to_thread(allow_connections, pg_url, False)  # phase 2: the database is away
            try:
                await asyncio.wait_for(reached(before_outage + per_phase), BOUND)
                await asyncio.to_thread(gw.ledger.in_outage.wait, BOUND)  # until the writer has met the outage
                during_outage = len(acknowledged) - before_outage
            finally:
                await asyncio.to_thread(allow_connections, pg_url, True)
            # phase 3: back; gRPC requests (their request id is checked in the ledger) succeed again
            await asyncio.wait_for(reached(len(acknowledged) + per_phase, by_grpc[0] + 5), BOUND)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        under_load = len(acknowledged)
        async with AsyncClient(grpc_target, key, retry=RetryPolicy(attempts=1)) as client:
            for i in range(5):  # afterwards, every new request succeeds
                result = await client.embed([f"after the outage {i}"], request_id=f"after-{uuid.uuid4().hex}")
                acknowledged[result.request_id] = result.usage.input_tokens
        await asyncio.to_thread(gw.ledger.flush)
    check = Database(pg_url)
    rows = check.query(
        "SELECT request_id, COUNT(*), SUM(input_tokens) FROM usage_records WHERE partner_id = ? GROUP BY request_id",
        (partner.id,),
    )
    check.close()
    store.close()
    stored = {request_id: int(tokens) for request_id, _, tokens in rows}
    codes = Counter(failed.values())
    ledger_logs = [r.msg for r in caplog.records if r.name == "serving.ledger"]
    logged = {
        what: sum(m.startswith(what) for m in ledger_logs) for what in ("ledger write failed", "ledger writes resumed")
    }
    print(
        f"backends terminated per kill {terminated}; acknowledged {under_load} under load"
        f" ({during_outage} while the database refused connections) + 5 after; failed {dict(codes) or 0};"
        f" ledger rows {len(rows)}; ledger outages {gw.ledger.outages}, log lines {dict(logged)}"
    )
    assert all(count == 1 for _, count, _ in rows)  # exactly once
    missing = [rid for rid in acknowledged if rid not in stored]
    assert not missing, f"acknowledged but not in the ledger: {missing[:5]}"
    assert all(stored[rid] == tokens for rid, tokens in acknowledged.items())
    assert len(set(stored) - set(acknowledged)) <= len(failed)  # a record without an ack is a failed request's
    assert set(codes) <= {"UNAVAILABLE", "503"}, f"failures other than UNAVAILABLE / 503: {codes}"
    assert all(n >= 1 for n in terminated)
    assert during_outage >= per_phase  # known keys kept working while the database was away (stale if error)
    assert gw.ledger.outages >= 1
    assert logged["ledger write failed"] == logged["ledger writes resumed"] == gw.ledger.outages  # once each
