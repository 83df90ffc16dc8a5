"""Unit tests of the pieces that need no models: settings, keys, auth, the error table, micro-batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.errors import ERROR_TABLE, INTERNAL, InvalidInput, QuotaExceeded, describe
from serving.gateway.microbatch import MicroBatcher
from serving.partners.auth import Authenticator
from serving.partners.keys import parse_key
from serving.partners.store import PartnerStore
from serving.settings import SettingsError, load_settings
from serving.storage.database import Database


def test_settings_parse_booleans_and_nested_values() -> None:
    settings = load_settings(env={"SERVING_GRPC_PORT": "6000", "SERVING_LIMITS_MAX_TEXTS_PER_CALL": "8"})
    assert settings.grpc_port == 6000 and settings.limits.max_texts_per_call == 8
    with pytest.raises(SettingsError):
        load_settings(env={"SERVING_GRPC_PORT": "70000"})
    with pytest.raises(SettingsError):
        load_settings(env={"SERVING_HTTP_TIMEOUT_S": "soon"})


def test_error_table_codes() -> None:
    assert describe(InvalidInput("x")).http_status == 400
    assert describe(QuotaExceeded("x")).grpc_code == "RESOURCE_EXHAUSTED"
    assert describe(ValueError("bug")) is INTERNAL
    assert all(kind.http_status != 500 for kind in ERROR_TABLE.values())


async def test_keys_are_hashed_and_checked(tmp_path: Path) -> None:
    store = PartnerStore(Database(str(tmp_path / "db.sqlite")))
    partner = store.create_partner("p")
    key = store.issue_key(partner.id)
    parsed = parse_key(key)
    assert parsed is not None and len(key) > 50
    raw = (tmp_path / "db.sqlite").read_bytes() + (tmp_path / "db.sqlite-wal").read_bytes()
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw
    now = [0.0]
    auth = Authenticator(store, ttl_s=5.0, clock=lambda: now[0])
    assert (await auth.authenticate(key)).partner_id == partner.id
    with pytest.raises(Exception, match="unknown API key"):
        await auth.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"))
    store.revoke_key(parsed.key_id)
    assert (await auth.authenticate(key)).partner_id == partner.id  # still cached
    now[0] = 6.0
    with pytest.raises(Exception, match="revoked"):
        await auth.authenticate(key)


async def test_microbatch_flushes_on_size_and_on_deadline() -> None:
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int]:
        calls.append(items)
        await release.wait()
        return [i * 10 for i in items]

    by_size = MicroBatcher(send, max_batch_size=3, max_wait_s=3600, max_inflight=0)
    pending = [asyncio.create_task(by_size.submit([i])) for i in range(3)]
    release.set()
    assert [await p for p in pending] == [[0], [10], [20]]
    assert calls == [[0, 1, 2]]

    calls.clear()
    by_deadline = MicroBatcher(send, max_batch_size=100, max_wait_s=0.0, max_inflight=0)
    assert await by_deadline.submit([1, 2]) == [10, 20]
    assert calls == [[1, 2]]

    calls.clear()
    oversize = MicroBatcher(send, max_batch_size=2, max_wait_s=3600, max_inflight=0)
    assert await oversize.submit([1, 2, 3]) == [10, 20, 30]  # a request never splits
    assert calls == [[1, 2, 3]]

    calls.clear()
    release.clear()
    adaptive = MicroBatcher(send, max_batch_size=100, max_wait_s=3600, max_inflight=1)
    first = asyncio.create_task(adaptive.submit([1]))  # an idle pipeline: leaves at the end of the loop turn
    await asyncio.sleep(0)  # the request joins its batch
    await asyncio.sleep(0)  # the batch leaves
    await asyncio.sleep(0)  # and reaches send()
    assert calls == [[1]]
    queued = [asyncio.create_task(adaptive.submit([i])) for i in (2, 3, 4)]  # pipeline full: they accumulate
    await asyncio.sleep(0)  # one loop turn: each new request is now waiting on its batch
    assert calls == [[1]]
    release.set()  # the first batch returns: the three accumulated requests leave together
    assert [await t for t in (first, *queued)] == [[10], [20], [30], [40]]
    assert calls == [[1], [2, 3, 4]]
