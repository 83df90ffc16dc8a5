"""The usage ledger: one record per admitted request, idempotent by request id, durable across SIGKILL,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import POSTGRES_URL, running_gateway
from gateway_process import start_gateway_process

from serving.gateway.app import Gateway
from serving.metering.journal import Journal
from serving.metering.ledger import Ledger
from serving.metering.record import UsageRecord
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import ApiError, AsyncClient, EmbedResult, RetryPolicy, UsageReport


def record(request_id: str, partner: str = "p_1", tokens: int = 3) -> UsageRecord:
    now = time.time()
    return UsageRecord(request_id, partner, "k", "minilm-l6", "embed", tokens, 0, "ok", 0.1, 2.0, now, now)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.db")
        return
    schema = f"t_{uuid.uuid4().hex[:10]}"  # a private schema per test on the shared server
    admin = Database(POSTGRES_URL)
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def totals(db: Database, partner: str = "p_1") -> tuple[int, int]:
    row = db.one("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0) FROM usage_records WHERE partner_id = ?", (partner,))
    assert row is not None
    return int(row[0]), int(row[1])


def test_records_are_batched_and_idempotent(database_url: str, tmp_path: Path) -> None:
    ledger = Ledger(Database(database_url), tmp_path / "journal")
    for i in range(250):
        ledger.record(record(f"r{i}"))
    ledger.record(record("r7"))  # the same request id again: stored once
    ledger.flush()
    assert totals(ledger.db) == (250, 750)
    ledger.close()
    assert not list((tmp_path / "journal").glob("*.jsonl"))  # everything stored: the journal is gone


def test_journal_replays_after_a_crash(database_url: str, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    for i in range(40):  # journaled (acknowledged) but never stored: the process "died" here
        journal.append(record(f"c{i}"))
    with journal._path(journal._segment).open("a") as torn:
        torn.write('["torn", "p_1"')  # killed inside write(): never acknowledged
    ledger = Ledger(Database(database_url), tmp_path / "journal")
    assert ledger.replayed == 40
    assert totals(ledger.db) == (40, 120)
    ledger.close()
    again = Ledger(Database(database_url), tmp_path / "journal")  # nothing left to replay, nothing doubled
    assert again.replayed == 0 and totals(again.db) == (40, 120)
    again.close()


def test_partner_store_on_postgres(database_url: str) -> None:
    store = PartnerStore(Database(database_url))
    partner = store.create_partner("pg-partner", plan="free")
    key = store.issue_key(partner.id)
    owner = store.key_owner(key.split("_")[1])
    assert owner is not None and owner.partner.id == partner.id and owner.plan.requests_per_minute == 60
    assert store.rotate_key(key.split("_")[1]) != key
    assert [k.revoked for k in store.keys(partner.id)] == [True, False]
    store.close()


async def test_sigkill_loses_nothing_acknowledged_and_doubles_nothing(
    settings: Settings, ray_models: dict[str, Any], store: PartnerStore
) -> None:
    partner = store.create_partner(f"killtest-{uuid.uuid4().hex[:6]}", plan="unlimited")
    key = store.issue_key(partner.id)
    env = {"SERVING_GATEWAY_ID": "kill-me", "SERVING_LEDGER_FLUSH_INTERVAL_S": "30"}  # records stay journal-only
    acknowledged: dict[str, int] = {}
    failed: set[str] = set()
    progress = asyncio.Event()

    async def worker(target: str, stop: asyncio.Event) -> None:
        async with AsyncClient(target, key, retry=RetryPolicy(attempts=1)) as client:
            while not stop.is_set():
                request_id = f"kill-{uuid.uuid4().hex}"
                try:
                    result = await client.embed([f"load {request_id[-6:]} goes on"], request_id=request_id)
                except ApiError:
                    failed.add(request_id)
                    return
                acknowledged[request_id] = result.usage.input_tokens
                if len(acknowledged) >= 60:
                    progress.set()

    process, ports = await start_gateway_process(settings, **env)
    stop = asyncio.Event()
    workers = [asyncio.create_task(worker(f"127.0.0.1:{ports['grpc_port']}", stop)) for _ in range(6)]
    await progress.wait()  # load is flowing and records are journaled: kill mid-load
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await asyncio.gather(*workers)
    killed_with = len(acknowledged)

    restarted, ports = await start_gateway_process(settings, **env)  # replays the journal on start
    stop.clear()
    async with AsyncClient(f"127.0.0.1:{ports['grpc_port']}", key) as client:
        for i in range(5):
            result = await client.embed([f"after restart {i}"], request_id=f"after-{uuid.uuid4().hex}")
            acknowledged[result.request_id] = result.usage.input_tokens
    restarted.send_signal(signal.SIGTERM)  # graceful: flushes the ledger before exiting
    assert await restarted.wait() == 0

    ledger = Database(settings.ledger_db_url)
    rows = ledger.query("SELECT request_id, input_tokens FROM usage_records WHERE partner_id = ?", (partner.id,))
    ledger.close()
    stored = dict(rows)
    print(f"acknowledged {killed_with} before SIGKILL, {len(acknowledged)} in all; ledger holds {len(rows)}")
    assert len(rows) == len(stored)  # nothing doubled
    missing = {rid for rid in acknowledged if rid not in stored}
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
    assert all(stored[rid] == tokens for rid, tokens in acknowledged.items())
    extra = set(stored) - set(acknowledged)
    assert extra <= failed, "the ledger holds requests no client sent"  # cut off by the kill, never acknowledged
    assert sum(acknowledged.values()) == sum(stored[rid] for rid in acknowledged)


async def _embed_then_usage(gw: Gateway, key: str) -> tuple[list[EmbedResult], UsageReport]:
    async with AsyncClient(f"127.0.0.1:{gw.grpc_port}", key) as client:
        results = [await client.embed([f"postgres row {i}"]) for i in range(5)]
        await asyncio.to_thread(gw.ledger.flush)
        return results, await client.get_usage()


async def test_gateway_on_postgres_meters_every_request(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any]
) -> None:
    """At scale: partners, keys and the ledger in PostgreSQL, the gateway unchanged."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = Database(POSTGRES_URL)
    admin.execute(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    store = PartnerStore(Database(url))
    try:
        partner = store.create_partner("pg-gateway", plan="standard")
        key = store.issue_key(partner.id)
        overrides = {"database_url": url, "ledger_database_url": url, "gateway_id": "pg-1"}
        async with running_gateway(settings, specs, ray_models, store, **overrides) as gw:
            results, report = await _embed_then_usage(gw, key)
        assert sum(row.requests for row in report.rows) == 5
        assert sum(row.input_tokens for row in report.rows) == sum(r.usage.input_tokens for r in results)
        check = Database(url)
        assert totals(check, partner.id)[0] == 5
        check.close()
    finally:
        store.close()
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
