"""Usage alerts by webhook through the real stack: gateways over the session's Ray models, a partner driven over
50/80/100 % of a small monthly budget with real model calls, and a real local HTTP receiver that fails the first
deliveries of every event. Each event arrives (is accepted) exactly once, with the same event id on every retry and a
valid signature; the deliveries list shows the attempts; a replay resends the same event; two replicas sharing the
database never send a delivery twice.

The gateways here have a partner database and ledger of their own (not the session gateway's), and tiny loop
intervals and backoff: every wait ends on an event at the receiver or a state the API reports.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from billing_support import wait_until
from conftest import running_gateway
from webhook_support import BOUND_S, Receiver, receiver

from serving.gateway.app import Gateway
from serving.identity.scopes import USAGE_READ, WEBHOOKS_WRITE
from serving.metering.record import UsageRecord
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import Settings, Webhooks
from serving.storage.database import Database
from serving.webhooks.events import Period
from serving.webhooks.store import WebhookStore

EMBED = "minilm-l6"
TEXT = "Usage alerts tell a partner when it has used a share of its monthly token budget."
FAST = Webhooks(
    evaluate_interval_s=0.05,
    dispatch_interval_s=0.05,
    timeout_s=5.0,
    max_attempts=5,
    backoff_base_s=0.02,
    backoff_max_s=0.1,
    max_endpoints=3,
)


@contextlib.asynccontextmanager
async def isolated(
    settings: Settings, specs: list[ModelSpec], handles: dict[str, Any], data_dir: Path, *gateway_ids: str
) -> AsyncIterator[tuple[PartnerStore, list[Gateway]]]:
    """Gateway replicas sharing one partner database and ledger of their own (SQLite files in ``data_dir``)."""
    store = PartnerStore(Database(str(data_dir / "serving.db")))
    try:
        async with contextlib.AsyncExitStack() as stack:
            gateways = [
                await stack.enter_async_context(
                    running_gateway(settings, specs, handles, store, data_dir=data_dir, gateway_id=gid, webhooks=FAST)
                )
                for gid in gateway_ids
            ]
            yield store, gateways
    finally:
        store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hooks_gateway(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[PartnerStore, Gateway]]:
    async with isolated(settings, specs, ray_models, tmp_path_factory.mktemp("webhooks"), "hooks-1") as (store, gws):
        yield store, gws[0]


def _partner(store: PartnerStore, monthly_tokens: int, scopes: frozenset[str] | None = None) -> tuple[str, str]:
    plan = f"wh-{uuid.uuid4().hex[:6]}"
    store.put_plan(Plan(plan, monthly_tokens=monthly_tokens))
    partner = store.create_partner(f"wh-{uuid.uuid4().hex[:6]}", plan=plan)
    return partner.id, store.issue_key(partner.id, scopes)


def _base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _register(base: str, key: str, url: str, thresholds: list[int]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base) as http:
        reply = await http.post("/v1/webhooks", json={"url": url, "thresholds": thresholds}, headers=_auth(key))
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


async def _deliveries(base: str, key: str, endpoint_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base) as http:
        reply = await http.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=_auth(key))
    assert reply.status_code == 200, reply.text
    return list(reply.json()["data"])


async def _settled(base: str, key: str, endpoint_id: str, count: int) -> list[dict[str, Any]]:
    """The endpoint's deliveries once ``count`` exist and none is pending (the dispatcher recorded every outcome)."""

    async def check() -> list[dict[str, Any]] | None:
        found = await _deliveries(base, key, endpoint_id)
        return found if len(found) == count and all(d["status"] != "pending" for d in found) else None

    return await wait_until(check, BOUND_S, f"{count} settled deliveries of {endpoint_id}")


async def _embed(http: httpx.AsyncClient, key: str) -> httpx.Response:
    return await http.post("/v1/embed", json={"model": EMBED, "texts": [TEXT]}, headers=_auth(key))


def _record_usage(gateway: Gateway, partner_id: str, tokens: int) -> None:
    """Usage through the ledger's own API (what the core records for an admitted request)."""
    now = time.time()
    gateway.ledger.record(
        UsageRecord(uuid.uuid4().hex, partner_id, "test", EMBED, "embed", tokens, 0, "ok", 0.0, 1.0, now, now)
    )


def _assert_each_event_accepted_once_after_retries(recv: Receiver, fail_first: int) -> None:
    assert recv.received and all(r.signature_ok for r in recv.received)
    for path, event_id in {(r.path, r.event_id) for r in recv.received}:
        requests = recv.requests(path, event_id)
        # The same event id on every attempt, numbered 1..n, never two at once, and one 200 at the end.
        assert [(r.attempt, r.answered) for r in requests] == [
            *((n, 500) for n in range(1, fail_first + 1)),
            (fail_first + 1, 200),
        ], (path, event_id)
        assert len({r.body["id"] for r in requests}) == 1 and requests[0].body["id"] == event_id


async def test_a_partner_crossing_50_80_100_percent_gets_each_alert_once_after_retries(
    hooks_gateway: tuple[PartnerStore, Gateway],
) -> None:
    store, gateway = hooks_gateway
    base, events = _base(gateway), WebhookStore(store.db)
    async with httpx.AsyncClient(base_url=base, timeout=BOUND_S) as http:
        _, probe_key = _partner(store, 0)
        probe = await _embed(http, probe_key)
        assert probe.status_code == 200, probe.text
        per_call = int(probe.json()["usage"]["input_tokens"])
        budget = 10 * per_call  # ten calls use it up exactly: 5 → 50 %, 8 → 80 %, 10 → 100 %
        partner_id, key = _partner(store, budget)
        async with receiver(fail_first=2) as recv:
            created = await _register(base, key, recv.url("/alerts"), [100, 50, 80])
            assert created["thresholds"] == [50, 80, 100] and created["secret"].startswith("whsec_")
            recv.secrets["/alerts"] = created["secret"]
            used = 0
            for threshold, calls in ((50, 5), (80, 3), (100, 2)):
                for _ in range(calls):
                    reply = await _embed(http, key)
                    assert reply.status_code == 200, reply.text
                    used += int(reply.json()["usage"]["input_tokens"])
                await recv.wait_for(f"the {threshold} % alert", functools.partial(_accepted_has, recv, threshold))
                # No event for a threshold the usage has not reached: the ledger holds exactly `used` tokens.
                period = Period.of(time.time()).name
                assert sorted(events.events(partner_id, "monthly_tokens", period)) == [
                    t for t in (50, 80, 100) if t <= threshold
                ]
            assert used == budget
            refused = await _embed(http, key)  # the budget is used up: the quota agrees with the alert
            assert refused.status_code == 429 and refused.json()["error"]["param"] == "monthly_tokens"
            deliveries = await _settled(base, key, created["id"], 3)
    _assert_each_event_accepted_once_after_retries(recv, fail_first=2)
    bodies = {r.threshold: r.body for r in recv.accepted()}
    assert sorted(bodies) == [50, 80, 100] and len(recv.accepted()) == 3
    for threshold, body in bodies.items():
        assert body["type"] == "usage.threshold_crossed" and body["partner_id"] == partner_id
        data = body["data"]
        assert (data["metric"], data["limit"], data["threshold_percent"]) == ("monthly_tokens", budget, threshold)
        assert data["used"] * 100 >= threshold * budget
    for delivery in deliveries:
        assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("delivered", 3, 200)
        assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
        assert delivery["attempt_log"][0]["error"] == "answered HTTP 500"
        assert delivery["event"] == bodies[delivery["event"]["data"]["threshold_percent"]]
        assert delivery["next_attempt_at"] is None and delivery["delivered_at"] is not None


def _accepted_has(recv: Receiver, threshold: int) -> bool:
    return threshold in {r.threshold for r in recv.accepted()}


async def test_replay_resends_the_same_event(hooks_gateway: tuple[PartnerStore, Gateway]) -> None:
    store, gateway = hooks_gateway
    base = _base(gateway)
    partner_id, key = _partner(store, 1000)
    async with receiver(fail_first=1) as recv:
        created = await _register(base, key, recv.url("/replayed"), [100])
        recv.secrets["/replayed"] = created["secret"]
        _record_usage(gateway, partner_id, 1000)
        await recv.wait_for("the 100 % alert", lambda: len(recv.accepted()) == 1)
        (delivery,) = await _settled(base, key, created["id"], 1)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", 2)
        async with httpx.AsyncClient(base_url=base) as http:
            reply = await http.post(f"/v1/webhooks/deliveries/{delivery['id']}/replay", headers=_auth(key))
        assert reply.status_code == 202, reply.text
        assert reply.json()["status"] == "pending" and reply.json()["event_id"] == delivery["event_id"]
        await recv.wait_for("the replay", lambda: len(recv.accepted()) == 2)
        (replayed,) = await _settled(base, key, created["id"], 1)
    first, again = recv.accepted()
    assert again.event_id == first.event_id == delivery["event_id"] and again.body == first.body
    assert again.signature_ok and again.attempt == 3
    assert (replayed["status"], replayed["attempts"]) == ("delivered", 3)
    assert [a["status_code"] for a in replayed["attempt_log"]] == [500, 200, 200]


async def test_routes_validate_at_the_edge_and_keep_partners_apart(hooks_gateway: tuple[PartnerStore, Gateway]) -> None:
    store, gateway = hooks_gateway
    _, key = _partner(store, 1000)
    _, other = _partner(store, 1000)
    _, reader = _partner(store, 1000, frozenset({USAGE_READ}))
    _, writer = _partner(store, 1000, frozenset({WEBHOOKS_WRITE}))
    async with httpx.AsyncClient(base_url=_base(gateway)) as http:

        async def post(body: dict[str, Any], credential: str = key) -> httpx.Response:
            return await http.post("/v1/webhooks", json=body, headers=_auth(credential))

        assert (await http.post("/v1/webhooks", json={"url": "https://example.com/h"})).status_code == 401
        for body, param in (
            ({"url": "http://example.com/h"}, "url"),
            ({"url": "https://10.0.0.7/h"}, "url"),
            ({"url": "https://example.com/h", "thresholds": [0]}, "thresholds"),
            ({"url": "https://example.com/h", "thresholds": [1001]}, "thresholds"),
            ({"url": "https://example.com/h", "thresholds": []}, "thresholds"),
            ({"url": "https://example.com/h", "thresholds": ["50"]}, "thresholds[0]"),
            ({"url": "https://example.com/h", "secret": "mine"}, "secret"),
        ):
            reply = await post(body)
            assert reply.status_code == 400, (body, reply.text)
            assert reply.json()["error"]["param"] == param, (body, reply.text)
        denied = await post({"url": "https://example.com/h"}, reader)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
        assert (await http.get("/v1/webhooks", headers=_auth(writer))).status_code == 403
        assert (await http.get("/v1/webhooks", headers=_auth(reader))).json() == {"data": []}
        assert (await post({"url": "https://example.com/h"}, writer)).status_code == 201

        created = (await post({"url": "https://example.com/mine"})).json()
        assert created["thresholds"] == [50, 80, 100]  # the default
        listed = (await http.get("/v1/webhooks", headers=_auth(key))).json()["data"]
        assert listed == [{k: v for k, v in created.items() if k != "secret"}]  # the secret is shown once
        assert (await http.get("/v1/webhooks", headers=_auth(other))).json() == {"data": []}
        endpoint = created["id"]
        for method, path in (
            ("GET", f"/v1/webhooks/{endpoint}/deliveries"),
            ("DELETE", f"/v1/webhooks/{endpoint}"),
            ("POST", "/v1/webhooks/deliveries/whd_nope/replay"),
        ):
            reply = await http.request(method, path, headers=_auth(other))
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found", (method, path)
        assert (await http.get(f"/v1/webhooks/{endpoint}/deliveries", headers=_auth(key))).json() == {"data": []}

        for n in range(2):  # FAST allows 3 endpoints per partner
            assert (await post({"url": f"https://example.com/{n}"})).status_code == 201
        full = await post({"url": "https://example.com/one-too-many"})
        assert full.status_code == 400 and "delete one first" in full.json()["error"]["message"]

        deleted = await http.delete(f"/v1/webhooks/{endpoint}", headers=_auth(key))
        assert deleted.status_code == 200 and deleted.json() == {"id": endpoint, "deleted": True}
        assert (await http.delete(f"/v1/webhooks/{endpoint}", headers=_auth(key))).status_code == 404
        assert (await http.get(f"/v1/webhooks/{endpoint}/deliveries", headers=_auth(key))).status_code == 404
        assert len((await http.get("/v1/webhooks", headers=_auth(key))).json()["data"]) == 2
        spec = (await http.get("/openapi.json")).json()
    assert {"/v1/webhooks", "/v1/webhooks/{endpoint_id}/deliveries"} <= set(spec["paths"])


async def test_two_replicas_sharing_the_database_send_each_delivery_once(
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("webhooks-pair")
    async with (
        isolated(settings, specs, ray_models, data_dir, "pair-a", "pair-b") as (store, gateways),
        receiver(fail_first=2) as recv,
    ):
        endpoints: list[tuple[str, str]] = []  # (key, endpoint id)
        for n in range(4):
            partner_id, key = _partner(store, 100)
            paths = [f"/p{n}"] if n else ["/p0a", "/p0b"]  # one partner with two endpoints: one event, two deliveries
            for path in paths:
                created = await _register(_base(gateways[n % 2]), key, recv.url(path), [50, 80, 100])
                recv.secrets[path] = created["secret"]
                endpoints.append((key, created["id"]))
            _record_usage(gateways[n % 2], partner_id, 100)  # 100 %: all three thresholds at once
        expected = {(path, t) for path in recv.secrets for t in (50, 80, 100)}
        await recv.wait_for("every alert", lambda: {(r.path, r.threshold) for r in recv.accepted()} == expected)
        for key, endpoint_id in endpoints:
            settled = await _settled(_base(gateways[0]), key, endpoint_id, 3)
            assert {(d["status"], d["attempts"]) for d in settled} == {("delivered", 3)}
    _assert_each_event_accepted_once_after_retries(recv, fail_first=2)
    assert len(recv.accepted()) == len(expected) == 15
    (events,) = store.db.one("SELECT COUNT(*) FROM webhook_events") or (0,)
    assert events == 12  # one per partner and threshold, though both replicas evaluated every partner
    event_ids = {r.event_id for r in recv.accepted() if r.path in ("/p0a", "/p0b")}
    assert len(event_ids) == 3  # the partner's two endpoints got the same three events
