"""Usage-alert webhooks in process, without Ray: the signature, URL and threshold rules, the backoff schedule, the
budget periods, the store's leases and the evaluator's idempotence on SQLite and PostgreSQL, and the dispatcher
against a real local receiver that fails the first deliveries."""

from __future__ import annotations

import datetime
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_postgres_database
from webhook_support import receiver

from serving.errors import InvalidInput, NotFound, RequestInProgress
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import SettingsError, Webhooks, load_settings
from serving.storage.database import Database
from serving.webhooks.backoff import backoff_s
from serving.webhooks.dispatcher import Dispatcher, build_client
from serving.webhooks.evaluator import Evaluator
from serving.webhooks.events import CreditSnapshot, Period, periods_to_check
from serving.webhooks.signer import SignatureError, new_secret, sign, signature, verify
from serving.webhooks.store import CANCELLED, DELIVERED, FAILED, PENDING, Attempt, WebhookStore
from serving.webhooks.urls import validate_thresholds, validate_url

FAST = Webhooks(timeout_s=5.0, max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05)


# --- signatures -----------------------------------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_other_secrets_and_old_timestamps() -> None:
    secret, body, now = new_secret(), b'{"id":"evt_1"}', 1_800_000_000
    header = sign(secret, body, now)
    assert header == f"t={now},v1={signature(secret, now, body)}" and secret.startswith("whsec_")
    assert verify(secret, header, body, now + 299) == now
    refused = {
        "tampered body": (secret, header, b'{"id":"evt_2"}', now),
        "other secret": (new_secret(), header, body, now),
        "too old": (secret, header, body, now + 301),
        "from the future": (secret, header, body, now - 301),
        "no v1": (secret, f"t={now}", body, now),
        "no timestamp": (secret, f"v1={signature(secret, now, body)}", body, now),
        "bad timestamp": (secret, "t=soon,v1=00", body, now),
        "malformed": (secret, "garbage", body, now),
        "timestamp swapped": (secret, f"t={now + 1},v1={signature(secret, now, body)}", body, now),
    }
    for case, (key, sig, data, at) in refused.items():
        with pytest.raises(SignatureError):
            verify(key, sig, data, at)
        assert case
    # During a secret rotation a sender may put two signatures; any one that matches is enough.
    both = f"t={now},v1={signature(new_secret(), now, body)},v1={signature(secret, now, body)}"
    assert verify(secret, both, body, now) == now


def test_the_documented_receiver_check_accepts_our_signatures_only() -> None:
    """The Python snippet of docs/api.md ("Verifying the signature"), run as a receiver would."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    section = text[text.index("**Verifying the signature.**") :]
    snippet = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    scope: dict[str, Any] = {}
    exec(compile(snippet, "docs/api.md", "exec"), scope)
    secret, body, now = new_secret(), b'{"id":"evt_1","type":"usage.threshold_crossed"}', int(time.time())
    assert scope["verify"](secret, sign(secret, body, now), body)
    assert not scope["verify"](secret, sign(secret, body, now), body + b" ")
    assert not scope["verify"](new_secret(), sign(secret, body, now), body)
    assert not scope["verify"](secret, sign(secret, body, now - 301), body)
    assert not scope["verify"](secret, "garbage", body)


# --- edge validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hooks/usage",
        "https://hooks.example.com:8443/a?b=c",
        "http://127.0.0.1:9000/hook",
        "http://localhost/hook",
        "http://[::1]:8080/hook",
        "https://127.0.0.1/hook",
    ],
)
def test_urls_accepted(url: str) -> None:
    assert validate_url(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com/hook", "https"),
        ("http://10.0.0.1/hook", "https"),
        ("ftp://example.com/hook", "absolute https"),
        ("example.com/hook", "absolute https"),
        ("https:///nohost", "absolute https"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://example.com/hook#frag", "fragment"),
        ("https://10.1.2.3/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "private"),
        ("https://[fd00::1]/hook", "private"),
        ("https://example.com:99999/hook", "not a valid URL"),
        ("https://example.com/" + "a" * 2048, "longer than"),
    ],
)
def test_urls_refused(url: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why) as caught:
        validate_url(url)
    assert caught.value.param == "url"


def test_loopback_can_be_switched_off() -> None:
    for url in ("http://127.0.0.1/hook", "https://localhost/hook", "http://[::1]/hook"):
        with pytest.raises(InvalidInput, match="loopback"):
            validate_url(url, allow_loopback=False)
    assert validate_url("https://example.com/hook", allow_loopback=False)


def test_thresholds() -> None:
    assert validate_thresholds([100, 50, 80, 50]) == (50, 80, 100)
    assert validate_thresholds([1, 1000]) == (1, 1000)
    for bad in ([], [0], [1001], [-5], list(range(1, 12))):
        with pytest.raises(InvalidInput) as caught:
            validate_thresholds(bad)
        assert caught.value.param == "thresholds"


# --- backoff, periods, settings -------------------------------------------------------------------------


def test_backoff_doubles_with_equal_jitter_up_to_the_cap() -> None:
    lowest = [backoff_s(n, 30.0, 3600.0, 0.0) for n in range(1, 10)]
    highest = [backoff_s(n, 30.0, 3600.0, 0.999999) for n in range(1, 10)]
    assert lowest == [15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1800.0, 1800.0]
    assert [round(h) for h in highest] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_s(10_000, 30.0, 3600.0, 0.5) == 2700.0  # no overflow far past the cap
    assert backoff_s(0, 30.0, 3600.0, 0.0) == 15.0


def test_periods_are_utc_calendar_months() -> None:
    at = datetime.datetime(2026, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    december = Period.of(at)
    assert (december.name, december.first_day, december.last_day) == ("2026-12", "2026-12-01", "2026-12-31")
    assert december.end == datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    january = Period.of(at + 1)
    assert january.name == "2027-01" and january.previous() == december
    assert Period.of(datetime.datetime(2028, 2, 10, tzinfo=datetime.UTC).timestamp()).last_day == "2028-02-29"
    assert periods_to_check(at + 1, 86_400) == [january, december]  # the first day also looks back
    assert periods_to_check(at + 86_401, 86_400) == [january]


def test_webhook_settings_from_the_environment() -> None:
    env = {"SERVING_WEBHOOKS_MAX_ATTEMPTS": "3", "SERVING_WEBHOOKS_ENABLED": "false"}
    hooks = load_settings(env=env).webhooks
    assert hooks.max_attempts == 3 and hooks.enabled is False and hooks.backoff_base_s == 30.0
    for bad in ({"SERVING_WEBHOOKS_TIMEOUT_S": "0"}, {"SERVING_WEBHOOKS_BACKOFF_MAX_S": "1"}):
        with pytest.raises(SettingsError, match="webhooks"):
            load_settings(env=bad)


# --- the store and the evaluator, on SQLite and PostgreSQL ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "serving.db")
        return
    with fresh_postgres_database("webhooks") as url:
        yield url


@pytest.fixture
def partners(db_url: str) -> Iterator[PartnerStore]:
    store = PartnerStore(Database(db_url))
    yield store
    store.close()


def _partner(store: PartnerStore, monthly_tokens: int) -> str:
    plan = f"wh-{uuid.uuid4().hex[:6]}"
    store.put_plan(Plan(plan, monthly_tokens=monthly_tokens))
    return store.create_partner(f"wh-{uuid.uuid4().hex[:6]}", plan=plan).id


def _endpoint(hooks: WebhookStore, partner_id: str, thresholds: tuple[int, ...] = (50, 80, 100), at: float = 0) -> str:
    url = f"https://example.com/{uuid.uuid4().hex[:6]}"
    return hooks.create_endpoint(partner_id, url, thresholds, new_secret(), 10, at or time.time()).id


def test_two_evaluators_create_each_event_and_delivery_once(partners: PartnerStore) -> None:
    hooks = WebhookStore(partners.db)
    now = time.time()
    budgeted, unlimited = _partner(partners, 1000), _partner(partners, 0)
    first = _endpoint(hooks, budgeted, (50, 80, 100))
    second = _endpoint(hooks, budgeted, (80, 90))
    _endpoint(hooks, unlimited)
    used = {budgeted: 850, unlimited: 10**9}  # 85 %: crosses 50 and 80 (twice subscribed), not 90 or 100

    def usage(partner_id: str, first_day: str, last_day: str) -> int:
        return used[partner_id] if first_day == Period.of(now).first_day else 0

    replicas = [Evaluator(hooks, usage), Evaluator(hooks, usage)]
    with ThreadPoolExecutor(4) as pool:
        created = sum(pool.map(lambda e: e.run(), replicas * 3))
    assert created == 3  # first: 50 and 80; second: 80
    events = hooks.events(budgeted, "monthly_tokens", Period.of(now).name)
    assert sorted(events) == [50, 80] and not hooks.events(unlimited, "monthly_tokens", Period.of(now).name)
    pairs = hooks.delivery_pairs(list(events.values()))
    assert pairs == {(events[50], first), (events[80], first), (events[80], second)}
    used[budgeted] = 1000
    assert replicas[0].run() == 2 and replicas[1].run() == 0  # 90 (second) and 100 (first)
    late = _endpoint(hooks, budgeted, (50,))  # registered after the crossing: gets the month's event, same id
    assert replicas[1].run() == 1 and (events[50], late) in hooks.delivery_pairs([events[50]])


def test_an_endpoint_hears_only_of_periods_that_ended_after_it_was_registered(partners: PartnerStore) -> None:
    hooks = WebhookStore(partners.db)
    partner = _partner(partners, 100)
    now = datetime.datetime(2026, 12, 1, 6, tzinfo=datetime.UTC).timestamp()  # inside the look-back of November
    old, new = _endpoint(hooks, partner, (50,), at=now - 40 * 86_400), _endpoint(hooks, partner, (50,), at=now)
    assert Evaluator(hooks, lambda *_: 100, clock=lambda: now).run() == 3  # November: old; December: both
    november = hooks.events(partner, "monthly_tokens", "2026-11")[50]
    december = hooks.events(partner, "monthly_tokens", "2026-12")[50]
    assert hooks.delivery_pairs([november, december]) == {(november, old), (december, old), (december, new)}


def test_credit_balance_thresholds_fire_once_per_set_of_grants(partners: PartnerStore) -> None:
    """``credit_balance``: money used of the active grants; a new grant starts a new period (thresholds armed
    again), and a partner without a monthly budget still hears of its balance."""
    hooks = WebhookStore(partners.db)
    partner = _partner(partners, 0)  # no monthly token budget
    endpoint = _endpoint(hooks, partner, (50, 80, 100))
    evaluator = Evaluator(hooks, lambda *_: 10**9)
    first = CreditSnapshot(("cg_a",), Decimal("4.99"), Decimal("10.00"), "USD")
    assert evaluator.run({partner: first}) == 0  # 49.9 %
    half = replace(first, used=Decimal("5.00"))
    assert evaluator.run({partner: half}) == 1 and evaluator.run({partner: half}) == 0
    assert evaluator.run({partner: replace(first, used=Decimal("9.00"))}) == 1  # 80
    events = hooks.events(partner, "credit_balance", first.period)
    assert sorted(events) == [50, 80]
    topped_up = CreditSnapshot(("cg_a", "cg_b"), Decimal("9.00"), Decimal("30.00"), "USD")  # 30 %: nothing yet
    assert topped_up.period != first.period and evaluator.run({partner: topped_up}) == 0
    assert evaluator.run({partner: replace(topped_up, used=Decimal("30.00"))}) == 3  # 50, 80 and 100 of the new set
    [delivery] = [d for d in hooks.deliveries(partner, endpoint, 10) if d.event["data"]["threshold_percent"] == 100]
    data = delivery.event["data"]
    assert (data["metric"], data["used"], data["limit"], data["remaining"]) == (
        "credit_balance",
        "30.00",
        "30.00",
        "0.00",
    )
    assert data["grants"] == ["cg_a", "cg_b"] and data["currency"] == "USD" and data["used_percent"] == 100.0


def _due_deliveries(partners: PartnerStore, hooks: WebhookStore, count: int) -> tuple[str, list[str]]:
    partner = _partner(partners, 100)
    endpoints = [_endpoint(hooks, partner, (50,)) for _ in range(count)]
    Evaluator(hooks, lambda *_: 100).run()
    return partner, endpoints


def test_a_lease_gives_each_due_delivery_to_one_replica(partners: PartnerStore) -> None:
    hooks = WebhookStore(partners.db)
    _due_deliveries(partners, hooks, 8)
    now = time.time()
    start = threading.Barrier(2)

    def claim(owner: str) -> list[str]:
        start.wait()
        return [c.delivery_id for _ in range(4) for c in hooks.claim(owner, now, 60.0, 3)]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(claim, ["a", "b"])
    assert len(a) + len(b) == 8 and not set(a) & set(b)
    assert not hooks.claim("c", now + 59, 60.0, 100)  # every lease still held
    taken = hooks.claim("c", now + 61, 60.0, 100)  # expired: a replica that died mid-attempt is taken over
    assert sorted(c.delivery_id for c in taken) == sorted(a + b)
    assert all(c.attempt == 2 for c in taken)
    stale = taken[0]
    first_owner = "a" if stale.delivery_id in a else "b"
    assert not hooks.finish(stale, first_owner, Attempt(1, now, 1.0, 200, None), DELIVERED, now)  # the lease moved on
    assert hooks.finish(stale, "c", Attempt(2, now, 1.0, 200, None), DELIVERED, now)


def test_delete_cancels_and_replay_waits_for_the_attempt_in_flight(partners: PartnerStore) -> None:
    hooks = WebhookStore(partners.db)
    partner, (kept, dropped) = _due_deliveries(partners, hooks, 2)
    now = time.time()
    claimed = {c.delivery_id: c for c in hooks.claim("a", now, 60.0, 10)}
    kept_delivery = hooks.deliveries(partner, kept, 10)[0]
    with pytest.raises(RequestInProgress):
        hooks.replay(partner, kept_delivery.id, now)
    hooks.delete_endpoint(partner, dropped, now)
    dropped_claim = next(c for c in claimed.values() if c.delivery_id != kept_delivery.id)
    assert not hooks.finish(dropped_claim, "a", Attempt(1, now, 1.0, 200, None), DELIVERED, now)  # stays cancelled
    assert hooks.finish(claimed[kept_delivery.id], "a", Attempt(1, now, 2.0, 500, "answered HTTP 500"), FAILED, now)
    with pytest.raises(NotFound):
        hooks.deliveries(partner, dropped, 10)
    other = _partner(partners, 100)
    with pytest.raises(NotFound):
        hooks.replay(other, kept_delivery.id, now)  # another partner's delivery does not exist for it
    replayed = hooks.replay(partner, kept_delivery.id, now)
    assert (replayed.status, replayed.attempts, replayed.next_attempt_at) == (PENDING, 1, now)
    again = hooks.claim("b", now, 60.0, 10)
    assert [(c.delivery_id, c.attempt, c.series_start) for c in again] == [(kept_delivery.id, 2, 1)]
    status = partners.db.one("SELECT status FROM webhook_deliveries WHERE endpoint_id = ?", (dropped,))
    assert status == (CANCELLED,)


# --- the dispatcher against a real receiver -------------------------------------------------------------


class _Clock:
    """Unix time that moves only when the test says: a backoff elapses without waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def past_any_backoff(self) -> None:
        self.now += FAST.backoff_max_s


async def test_dispatcher_retries_until_each_event_is_accepted_once(tmp_path: Path) -> None:
    partners = PartnerStore(Database(str(tmp_path / "serving.db")))
    hooks = WebhookStore(partners.db)
    partner, secret, clock = _partner(partners, 100), new_secret(), _Clock()
    async with receiver(fail_first=2) as recv, build_client(FAST) as client:
        endpoint = hooks.create_endpoint(partner, recv.url("/a"), (50, 100), secret, 10, clock())
        recv.secrets["/a"] = secret
        assert Evaluator(hooks, lambda *_: 100, clock).run() == 2
        dispatcher = Dispatcher(hooks, FAST, "test", client, clock)
        for _ in range(3):  # three rounds: two answered 500, then 200
            assert await dispatcher.run_once() == 2
            clock.past_any_backoff()
        assert await dispatcher.run_once() == 0  # both delivered: nothing is due any more
    by_event = {r.event_id for r in recv.received}
    assert len(by_event) == 2 and all(r.signature_ok for r in recv.received)
    for event_id in by_event:
        assert [(r.attempt, r.answered) for r in recv.requests("/a", event_id)] == [(1, 500), (2, 500), (3, 200)]
    assert sorted(r.threshold for r in recv.accepted()) == [50, 100]
    deliveries = hooks.deliveries(partner, endpoint.id, 10)
    assert {(d.status, d.attempts, d.last_status_code) for d in deliveries} == {(DELIVERED, 3, 200)}
    assert [[a.status_code for a in d.attempt_log] for d in deliveries] == [[500, 500, 200]] * 2
    partners.close()


async def test_dispatcher_waits_out_the_backoff_and_gives_up_after_max_attempts(tmp_path: Path) -> None:
    partners = PartnerStore(Database(str(tmp_path / "serving.db")))
    hooks = WebhookStore(partners.db)
    partner, clock = _partner(partners, 100), _Clock()
    config = replace(FAST, max_attempts=2, backoff_base_s=1.0, backoff_max_s=1.0)
    async with receiver(fail_first=100) as recv, build_client(config) as client:
        endpoint = hooks.create_endpoint(partner, recv.url("/down"), (100,), new_secret(), 10, clock())
        Evaluator(hooks, lambda *_: 100, clock).run()
        dispatcher = Dispatcher(hooks, config, "test", client, clock)
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0  # not due before its backoff (0.5..1 s) has passed
        clock.now += 1.0
        assert await dispatcher.run_once() == 1
        clock.now += 1.0
        assert await dispatcher.run_once() == 0  # failed: never tried again
    (delivery,) = hooks.deliveries(partner, endpoint.id, 1)
    assert (delivery.status, delivery.attempts, delivery.last_error) == (FAILED, 2, "answered HTTP 500")
    assert len(recv.received) == 2
    partners.close()
