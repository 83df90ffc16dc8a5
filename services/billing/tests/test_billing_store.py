"""The store on SQLite and PostgreSQL: a close is all or nothing, and a closed period is never rewritten."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.counters import Sample, Series
from billing.store import BillingStore, StoredInvoice
from serving.storage.database import Database

POSTGRES_URL = os.environ.get("SERVING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BillingStore]:
    if request.param == "sqlite":
        s = BillingStore(Database(str(tmp_path / "billing.db")))
        yield s
        s.close()
        return
    schema = f"b_{uuid.uuid4().hex[:10]}"  # a private schema per test on the shared server
    admin = Database(POSTGRES_URL)
    admin.execute(f"CREATE SCHEMA {schema}")
    s = BillingStore(Database(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"))
    yield s
    s.close()
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def invoice(partner: str) -> StoredInvoice:
    return StoredInvoice("2026-11", partner, "ok", f'{{"partner": "{partner}"}}\n', "csv\n")


class Crash(Exception):
    pass


def test_a_close_that_fails_before_commit_leaves_nothing(store: BillingStore) -> None:
    def crash() -> None:
        raise Crash

    with pytest.raises(Crash):
        store.write_close("2026-11", 0.0, 1.0, [invoice("a"), invoice("b")], [("a", 0.0, 1, 1, 1, 1)], crash)
    assert not store.is_closed("2026-11") and store.invoices() == [] and store.reconciliation("2026-11") == []
    assert store.write_close("2026-11", 0.0, 1.0, [invoice("a"), invoice("b")], [("a", 0.0, 1, 1, 1, 1)])
    assert [i.partner for i in store.invoices("2026-11")] == ["a", "b"]
    assert not store.write_close("2026-11", 0.0, 1.0, [invoice("c")], [])  # closed: nothing rewritten
    assert [i.partner for i in store.invoices("2026-11")] == ["a", "b"]


def test_samples_and_baselines(store: BillingStore) -> None:
    one = Series("gw", "p", "m", "requests", (("operation", "embed"), ("status", "ok")), [Sample(5.0, 3)])
    store.add_samples("gw", "http://gw/metrics", [one], 5.0)
    later = Series("gw", "p", "m", "requests", one.labels, [Sample(15.0, 4, created=1.5)])
    store.add_samples("gw", "http://gw/metrics", [later], 15.0)
    [found] = store.series(10.0, 20.0)
    assert found.labels == one.labels and found.samples == [Sample(5.0, 3), Sample(15.0, 4, created=1.5)]
    assert store.last_samples()[("gw", "p", "m", "requests", '[["operation","embed"],["status","ok"]]')].value == 4
    store.scrape_failed("gw", "http://gw/metrics", 20.0, "boom")
    [state] = store.targets()
    assert state.last_success == 15.0 and state.last_error == "boom"
