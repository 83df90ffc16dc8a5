"""Unit tests of the pieces that need no models: settings, keys, auth, the error table, micro-batching."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from serving.errors import ERROR_TABLE, INTERNAL, InvalidInput, QuotaExceeded, Unavailable, describe
from serving.gateway.microbatch import MicroBatcher
from serving.metering.journal import Journal
from serving.metering.record import UsageRecord
from serving.partners.auth import Authenticator
from serving.partners.keys import new_key, parse_key
from serving.partners.store import KeyOwner, Partner, PartnerStore, StoredKey
from serving.plans import DEFAULT_PLAN, DEFAULT_PLANS
from serving.settings import SettingsError, load_settings
from serving.storage.database import Database, DatabaseUnavailable


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


class FakeKeys:
    """A key directory in memory. ``down`` makes lookups fail as the database handle does when its server is
    away; while ``gate`` is clear, lookups wait in their thread (a slow database)."""

    def __init__(self) -> None:
        self.owners: dict[str, KeyOwner] = {}
        self.calls = 0
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def add(self, partner_id: str) -> str:
        key, parsed = new_key()
        stored = StoredKey(parsed.key_id, partner_id, parsed.digest, False, 0.0)
        partner = Partner(partner_id, partner_id, DEFAULT_PLAN, False)
        self.owners[parsed.key_id] = KeyOwner(stored, partner, next(p for p in DEFAULT_PLANS if p.name == DEFAULT_PLAN))
        return key

    def key_owner(self, key_id: str) -> KeyOwner | None:
        self.calls += 1
        assert self.gate.wait(10)
        if self.down:
            raise DatabaseUnavailable()
        return self.owners.get(key_id)


async def test_auth_misses_share_one_lookup_and_the_cache_evicts_one_at_a_time() -> None:
    keys = FakeKeys()
    a, b, c = keys.add("p_a"), keys.add("p_b"), keys.add("p_c")
    auth = Authenticator(keys, ttl_s=60.0, max_entries=2)
    keys.gate.clear()
    waiting = [asyncio.create_task(auth.authenticate(a)) for _ in range(10)]
    await asyncio.wait(waiting, timeout=0)  # they all start and wait on the one lookup
    keys.gate.set()
    assert {caller.partner_id for caller in await asyncio.gather(*waiting)} == {"p_a"}
    assert keys.calls == 1
    await auth.authenticate(b)
    await auth.authenticate(c)  # a third key id: only the least recently used one (a) goes
    assert keys.calls == 3
    await auth.authenticate(b)
    await auth.authenticate(c)
    assert keys.calls == 3
    await auth.authenticate(a)
    assert keys.calls == 4
    auth.close()


async def test_auth_database_outage_is_unavailable_or_a_recent_entry() -> None:
    keys = FakeKeys()
    known, unknown = keys.add("p_known"), keys.add("p_unknown")
    now = [0.0]
    auth = Authenticator(keys, ttl_s=2.0, clock=lambda: now[0], stale_if_error_s=60.0)
    assert (await auth.authenticate(known)).partner_id == "p_known"
    now[0] = 10.0  # expired: the next call asks the database, which is away
    keys.down = True
    assert (await auth.authenticate(known)).partner_id == "p_known"  # stale if error
    assert (auth.stale_answers, keys.calls) == (1, 2)
    keys.gate.clear()  # a lookup now hangs: a known key is still answered at once while the database is down
    assert (await auth.authenticate(known)).partner_id == "p_known"
    assert auth.stale_answers == 2
    keys.gate.set()
    with pytest.raises(Unavailable, match="partner database is unreachable") as raised:
        await auth.authenticate(unknown)  # no entry to fall back on
    kind = describe(raised.value)
    assert (kind.grpc_code, kind.http_status, raised.value.retry_after_s) == ("UNAVAILABLE", 503, 1.0)
    now[0] = 100.0  # beyond the stale window: a known key is not trusted any longer
    with pytest.raises(Unavailable):
        await auth.authenticate(known)
    keys.down = False  # back: lookups answer again and refresh the cache
    assert (await auth.authenticate(unknown)).partner_id == "p_unknown"
    assert (await auth.authenticate(known)).partner_id == "p_known"
    assert auth.stale_answers == 2
    auth.close()


async def test_auth_lookups_do_not_queue_behind_the_default_executor() -> None:
    """Admin and usage queries run in the loop's default executor; filling it leaves key lookups running."""
    keys = FakeKeys()
    key = keys.add("p_1")
    auth = Authenticator(keys, ttl_s=60.0)
    blocked = threading.Event()
    loop = asyncio.get_running_loop()
    hogs = [loop.run_in_executor(None, blocked.wait, 30) for _ in range(40)]  # more than its 32 threads at most
    try:
        assert (await asyncio.wait_for(auth.authenticate(key), 10)).partner_id == "p_1"
    finally:
        blocked.set()
        await asyncio.gather(*hogs)
    auth.close()


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


def test_a_record_after_the_journal_closed_is_kept_for_the_next_start(tmp_path: Path) -> None:
    """A call cut off at shutdown may finish after the ledger closed: its record lands in a segment of its own,
    which the next process replays (it is never written to a closed file or lost)."""
    record = UsageRecord("late-1", "p_1", "k", "minilm-l6", "embed", 3, 0, "cancelled", 0.0, 1.0, 10.0, 11.0)
    journal = Journal(tmp_path)
    journal.close(all_stored=True)
    journal.append(record)
    journal.close(all_stored=False)
    replayed = [r for path in Journal(tmp_path).pending_segments() for r in Journal.read(path)]
    assert replayed == [record]
