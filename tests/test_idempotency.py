"""Idempotency keys: a retry with the same key and body replays the original outcome and is not billed again;
the same key with another body is refused (422 / FAILED_PRECONDITION); a retry while the first still runs gets
409 / ABORTED with retry-after. Both stores (in-process and Redis) keep the same contract."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from conftest import REDIS_URL

from serving import domain
from serving.errors import Overloaded, Unavailable
from serving.gateway.app import Gateway
from serving.idempotency.keys import IdempotencyKeys
from serving.idempotency.redis_store import RedisIdempotency
from serving.idempotency.store import TOO_LARGE, Claim, IdempotencyStore, MemoryIdempotency
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import ApiError, AsyncClient, GenerateResult, RetryPolicy, TextDelta

GEN = "smollm2-135m-instruct"


@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="session")
async def idem(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    store: IdempotencyStore
    if request.param == "memory":
        store = MemoryIdempotency(ttl_s=60.0, max_bytes=64, running_ttl_s=30.0)
    else:
        store = RedisIdempotency(REDIS_URL, ttl_s=60.0, max_bytes=64, running_ttl_s=30.0)
    yield store
    await store.close()


async def test_a_key_runs_once_then_replays(idem: IdempotencyStore) -> None:
    partner, key = f"p_{uuid.uuid4().hex[:12]}", f"order-{uuid.uuid4().hex[:8]}"
    assert (await idem.begin(partner, key, "body-1")).state == "new"
    assert (await idem.begin(partner, key, "body-1")).state == "in_progress"
    assert (await idem.begin(partner, key, "body-2")).state == "mismatch"
    assert (await idem.begin(f"{partner}x", key, "body-1")).state == "new"  # another partner's key space
    await idem.finish(partner, key, "body-1", b"the outcome")
    assert await idem.begin(partner, key, "body-1") == Claim("done", b"the outcome")
    assert (await idem.begin(partner, key, "body-2")).state == "mismatch"
    await idem.release(partner, key, "body-1")  # a finished key is never given back
    assert (await idem.begin(partner, key, "body-1")).outcome == b"the outcome"


async def test_a_request_not_admitted_gives_its_key_back(idem: IdempotencyStore) -> None:
    partner, key = f"p_{uuid.uuid4().hex[:12]}", f"order-{uuid.uuid4().hex[:8]}"
    assert (await idem.begin(partner, key, "body-1")).state == "new"
    await idem.release(partner, key, "body-2")  # only the claim's own body releases it
    assert (await idem.begin(partner, key, "body-1")).state == "in_progress"
    await idem.release(partner, key, "body-1")
    assert (await idem.begin(partner, key, "body-2")).state == "new"  # free again, for any body


async def test_an_outcome_over_the_cap_is_kept_as_a_marker(idem: IdempotencyStore) -> None:
    partner, key = f"p_{uuid.uuid4().hex[:12]}", f"order-{uuid.uuid4().hex[:8]}"
    await idem.begin(partner, key, "body")
    await idem.finish(partner, key, "body", b"x" * 65)  # the cap is 64 bytes here
    assert (await idem.begin(partner, key, "body")).outcome == TOO_LARGE


async def test_memory_keys_expire_and_stay_bounded() -> None:
    now = [0.0]
    idem = MemoryIdempotency(ttl_s=10.0, max_bytes=64, running_ttl_s=5.0, max_entries=3, clock=lambda: now[0])
    await idem.begin("p", "k1", "b")
    now[0] = 6.0  # a claim whose request never finished (its gateway died) frees the key after running_ttl_s
    assert (await idem.begin("p", "k1", "b")).state == "new"
    await idem.finish("p", "k1", "b", b"done")
    now[0] = 15.0
    assert (await idem.begin("p", "k1", "b")).state == "done"
    now[0] = 17.0  # ttl_s after it finished: forgotten
    assert (await idem.begin("p", "k1", "b")).state == "new"
    for key in ("k2", "k3", "k4"):
        await idem.begin("p", key, "b")
        await idem.finish("p", key, "b", b"done")
    # At most three entries: the oldest finished one went first (k1's running claim stays).
    states = [(await idem.begin("p", key, "b")).state for key in ("k1", "k3", "k4")]
    assert states == ["in_progress", "done", "done"]


def _ledger_rows(settings: Settings, partner_id: str, request_id: str) -> int:
    db = Database(settings.ledger_db_url)
    try:
        rows = db.query(
            "SELECT COUNT(*) FROM usage_records WHERE partner_id = ? AND request_id = ?", (partner_id, request_id)
        )
    finally:
        db.close()
    return int(rows[0][0])


def _partner(store: PartnerStore) -> tuple[str, str]:
    partner = store.create_partner(f"idem-{uuid.uuid4().hex[:6]}", plan="unlimited")
    return partner.id, store.issue_key(partner.id)


def _stable(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in ("date", "idempotent-replayed", "content-length")}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embed", {"model": "minilm-l6", "texts": ["replay me", "and me"]}),
        ("/v1/embeddings", {"model": "minilm-l6", "input": ["replay me"]}),
        ("/v1/generate", {"model": GEN, "prompt": "Say hello.", "max_tokens": 12, "temperature": 0.9, "seed": 3}),
        ("/v1/chat/completions", {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}),
    ],
)
async def test_http_replays_the_original_response_and_bills_once(
    gateway: Gateway, settings: Settings, store: PartnerStore, http_base: str, path: str, body: dict[str, Any]
) -> None:
    partner_id, key = _partner(store)
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    headers = {"authorization": f"Bearer {key}", "idempotency-key": request_id}
    async with httpx.AsyncClient(base_url=http_base, headers=headers, timeout=60) as http:
        first = await http.post(path, json=body)
        again = await http.post(path, json=body)
        other = await http.post(path, json=_changed(body))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.content == first.content  # byte for byte, sampled text and created time included
    assert _stable(again.headers) == _stable(first.headers) and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert request_id in other.json()["error"]["message"]
    await asyncio.to_thread(gateway.ledger.flush)
    assert _ledger_rows(settings, partner_id, request_id) == 1


def _changed(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with one field changed."""
    if "texts" in body:
        return {**body, "texts": [*body["texts"], "one more"]}
    if "input" in body:
        return {**body, "input": ["something else"]}
    return {**body, "max_tokens": body["max_tokens"] + 1}


async def test_grpc_replays_and_refuses_another_body(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str
) -> None:
    partner_id, key = _partner(store)
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    async with AsyncClient(grpc_target, key, retry=RetryPolicy(attempts=1)) as client:
        first = await client.generate("Name a fruit.", max_tokens=10, temperature=0.9, seed=5, request_id=request_id)
        again = await client.generate("Name a fruit.", max_tokens=10, temperature=0.9, seed=5, request_id=request_id)
        streamed = [e async for e in client.generate_stream("Name a fruit.", max_tokens=10, temperature=0.9, seed=5,
                                                              request_id=request_id)]  # fmt: skip
        with pytest.raises(ApiError) as refused:
            await client.generate("Name a fruit.", max_tokens=11, temperature=0.9, seed=5, request_id=request_id)
    assert again == first
    # A finished stream's replay: its whole text as one delta, then the same final result.
    assert streamed == [TextDelta(first.text, first.usage.output_tokens), first]
    assert refused.value.code == "FAILED_PRECONDITION" and request_id in str(refused.value)
    await asyncio.to_thread(gateway.ledger.flush)
    assert _ledger_rows(settings, partner_id, request_id) == 1


async def test_a_duplicate_while_the_first_runs_gets_409_aborted(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str, http_base: str
) -> None:
    partner_id, key = _partner(store)
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    prompt = "Count from one to twenty."
    async with AsyncClient(grpc_target, key, retry=RetryPolicy(attempts=1)) as client:
        stream = client.generate_stream(prompt, max_tokens=40, temperature=0.0, request_id=request_id)
        first = await anext(stream)  # the first request is admitted and running
        assert isinstance(first, TextDelta)
        with pytest.raises(ApiError) as aborted:
            await client.generate(prompt, max_tokens=40, temperature=0.0, request_id=request_id)
        assert aborted.value.code == grpc.StatusCode.ABORTED.name and aborted.value.retry_after_s == 1.0
        # The same key over HTTP (messages, not prompt: the gRPC client sends one user message).
        body = {"model": GEN, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0.0}
        async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {key}"}) as http:
            conflict = await http.post("/v1/generate", json={**body, "request_id": request_id})
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "request_in_progress"
        assert conflict.headers["retry-after"] == "1"
        rest = [event async for event in stream]
    final = rest[-1]
    assert isinstance(final, GenerateResult)
    async with AsyncClient(grpc_target, key) as client:  # now it replays
        assert await client.generate(prompt, max_tokens=40, temperature=0.0, request_id=request_id) == final
    await asyncio.to_thread(gateway.ledger.flush)
    assert _ledger_rows(settings, partner_id, request_id) == 1


async def test_a_request_that_was_not_admitted_can_be_retried_with_its_key(
    gateway: Gateway, store: PartnerStore, http_base: str
) -> None:
    _, key = _partner(store)
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    headers = {"authorization": f"Bearer {key}", "idempotency-key": request_id}
    async with httpx.AsyncClient(base_url=http_base, headers=headers) as http:
        bad = await http.post("/v1/embed", json={"model": "minilm-l6", "texts": []})  # invalid: never admitted
        assert bad.status_code == 400
        fixed = await http.post("/v1/embed", json={"model": "minilm-l6", "texts": ["now valid"]})
    assert fixed.status_code == 200 and fixed.json()["request_id"] == request_id


async def test_a_ledger_outage_while_claiming_gives_the_key_back() -> None:
    """The ledger lookup of a new claim fails (database down: 503): the key is free again for the retry."""
    store = MemoryIdempotency(ttl_s=60.0, max_bytes=64, running_ttl_s=30.0)

    def unreachable(_partner: str, _key: str) -> bool:
        raise Unavailable("the partner database is unreachable", retry_after_s=1.0)

    with pytest.raises(Unavailable):
        await IdempotencyKeys(store, unreachable).claim("p", "order-1", "body")
    assert await IdempotencyKeys(store, lambda _p, _k: False).claim("p", "order-1", "body") is None


async def test_a_retry_scoped_key_is_kept_briefly_and_never_read_from_the_ledger() -> None:
    """The SDK's automatic keys (``Idempotency-Scope: retry``) cover one call's retries: the outcome is kept for
    ``retry_ttl_s``, not the day long-lived keys get, and no ledger read is made for them."""
    now = [1000.0]
    store = MemoryIdempotency(ttl_s=86_400.0, max_bytes=1 << 16, running_ttl_s=30.0, clock=lambda: now[0])

    def no_ledger(_partner: str, _key: str) -> bool:
        raise AssertionError("a retry-scoped key must not cost a ledger read")

    keys = IdempotencyKeys(store, no_ledger, retry_ttl_s=600.0)
    assert await keys.claim("p", "auto-1", "body", retry_scoped=True) is None
    result = domain.EmbedResult("minilm-l6", [[1.0]], domain.Usage(3, 0), "auto-1")
    await keys.settle("p", "auto-1", "body", True, result, None, 0, retry_scoped=True)
    now[0] += 599.0
    assert await keys.claim("p", "auto-1", "body", retry_scoped=True) == result  # a retry replays it
    now[0] += 2.0
    assert await keys.claim("p", "auto-1", "body", retry_scoped=True) is None  # gone after ten minutes
    # A client's own key keeps the day.
    long_lived = IdempotencyKeys(store, lambda _p, _k: False, retry_ttl_s=600.0)
    assert await long_lived.claim("p", "order-9", "body") is None
    await long_lived.settle("p", "order-9", "body", True, result, None, 0)
    now[0] += 86_000.0
    assert await long_lived.claim("p", "order-9", "body") == result


async def test_the_sdk_marks_only_its_own_keys_as_retry_scoped(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    scoped: list[tuple[str, bool]] = []
    claim = gateway.keys.claim

    async def spy(partner_id: str, key: str, fingerprint: str, retry_scoped: bool = False) -> object:
        scoped.append((key, retry_scoped))
        return await claim(partner_id, key, fingerprint, retry_scoped)

    monkeypatch.setattr(gateway.keys, "claim", spy)
    _, key = _partner(store)
    async with AsyncClient(grpc_target, key) as client:
        auto = await client.embed(["automatic key"])
        await client.embed(["my key"], request_id="order-own-1")
    assert scoped == [(auto.request_id, True), ("order-own-1", False)]


async def test_a_request_the_model_refused_costs_nothing_and_frees_its_key(
    gateway: Gateway, settings: Settings, store: PartnerStore, http_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model turned the request away before producing anything (at capacity): 503, no usage record, quota
    refunded, and the retry with the same key runs (it is not a replay of the 503)."""
    partner_id, key = _partner(store)
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    route = gateway.router.routes["minilm-l6"]

    async def at_capacity(_items: list[Any], _parent: object = None) -> list[Any]:
        raise Overloaded("the model is at capacity; retry shortly", retry_after_s=1.0)

    headers = {"authorization": f"Bearer {key}", "idempotency-key": request_id}
    body = {"model": "minilm-l6", "texts": ["refused, then served"]}
    async with httpx.AsyncClient(base_url=http_base, headers=headers) as http:
        with monkeypatch.context() as patch:
            patch.setattr(route, "infer", at_capacity)
            refused = await http.post("/v1/embed", json=body)
        await asyncio.to_thread(gateway.ledger.flush)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert _ledger_rows(settings, partner_id, request_id) == 0
        served = await http.post("/v1/embed", json=body)
    assert served.status_code == 200 and "idempotent-replayed" not in served.headers
    await asyncio.to_thread(gateway.ledger.flush)
    assert _ledger_rows(settings, partner_id, request_id) == 1
