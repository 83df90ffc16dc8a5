"""Partners see only their own data; admin routes need the admin token; revocation, disabling and plan
changes reach every gateway replica within 5 s without a restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import httpx
import pytest
from conftest import ADMIN_TOKEN, running_gateway
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from serving.gateway.app import Gateway
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import Settings
from serving_sdk import ApiError, AsyncClient
from serving_sdk.v1 import inference_pb2

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
EMBED = {"model": "minilm-l6", "texts": ["hello there"]}


def new_partner(store: PartnerStore, plan: str = "unlimited") -> tuple[str, str]:
    partner = store.create_partner(f"partner-{uuid.uuid4().hex[:8]}", plan=plan)
    return partner.id, store.issue_key(partner.id)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_partner_reads_only_its_own_usage(
    gateway: Gateway, http_base: str, ops_base: str, grpc_target: str, store: PartnerStore
) -> None:
    a_id, a_key = new_partner(store)
    b_id, b_key = new_partner(store)
    async with httpx.AsyncClient(base_url=http_base) as http, httpx.AsyncClient(base_url=ops_base) as ops:
        for _ in range(2):
            assert (await http.post("/v1/embed", json=EMBED, headers=bearer(a_key))).status_code == 200
        assert (await http.post("/v1/embed", json=EMBED, headers=bearer(b_key))).status_code == 200
        await asyncio.to_thread(gateway.ledger.flush)
        mine = (await http.get("/v1/usage", headers=bearer(a_key))).json()
        assert mine["partner_id"] == a_id and sum(r["requests"] for r in mine["rows"]) == 2
        for params in ({"partner": b_id}, {"partner_id": b_id}, {"start_day": "2020-01-01", "partner": b_id}):
            sneaky = await http.get("/v1/usage", params=params, headers=bearer(a_key))
            assert sneaky.status_code == 400, sneaky.text
        assert (await http.get("/v1/usage")).status_code == 401
        # Admin routes: partner keys are refused, the admin token works.
        assert (await ops.get("/admin/v1/partners", headers=bearer(a_key))).status_code == 403
        assert (await ops.get("/admin/v1/partners")).status_code == 401
        listed = await ops.get("/admin/v1/partners", headers=ADMIN)
        assert listed.status_code == 200 and {a_id, b_id} <= {p["id"] for p in listed.json()}
        today = time.strftime("%Y-%m-%d", time.gmtime())
        theirs = await ops.get(
            "/admin/v1/usage", params={"partner": b_id, "start_day": today, "end_day": today}, headers=ADMIN
        )
        assert sum(r["requests"] for r in theirs.json()) == 1
    async with AsyncClient(grpc_target, b_key) as client:
        report = await client.get_usage()
    assert report.partner_id == b_id and sum(r.requests for r in report.rows) == 1


async def test_revoked_key_is_rejected_on_every_replica_within_5s(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore, http_base: str
) -> None:
    _, key = new_partner(store)
    async with running_gateway(settings, specs, ray_models, store, gateway_id="replica-2") as second:
        bases = [http_base, f"http://127.0.0.1:{second.http_port}"]
        async with httpx.AsyncClient() as http:
            for base in bases:
                assert (await http.post(f"{base}/v1/embed", json=EMBED, headers=bearer(key))).status_code == 200
            key_id = key.split("_")[1]
            revoked = await http.post(
                f"http://127.0.0.1:{second.ops_port}/admin/v1/keys/{key_id}/revoke", headers=ADMIN
            )
            assert revoked.json() == {"key_id": key_id, "revoked": True}
            started = time.monotonic()
            pending = set(bases)
            while pending:  # each probe is a real call; stop as soon as every replica rejects the key
                for base in list(pending):
                    reply = await http.get(f"{base}/v1/models", headers=bearer(key))
                    if reply.status_code == 401:
                        pending.discard(base)
                assert time.monotonic() - started < 5.0, f"still accepted by {pending}"
    print(f"revocation reached both replicas in {time.monotonic() - started:.2f} s")


async def test_disabled_partner_finishes_in_flight_and_is_refused_after(
    grpc_target: str, http_base: str, ops_base: str, store: PartnerStore
) -> None:
    partner_id, key = new_partner(store)
    async with AsyncClient(grpc_target, key) as client, httpx.AsyncClient(base_url=http_base) as http:
        stream = client.generate_stream("Count from one to twenty.", temperature=0.0, max_tokens=40)
        first = await anext(stream)  # admitted and producing
        disabled = await http.post(
            f"{ops_base}/admin/v1/partners/{partner_id}/disabled", json={"disabled": True}, headers=ADMIN
        )
        assert disabled.json()["disabled"] is True
        events = [first] + [event async for event in stream]
        assert events[-1].usage.output_tokens > 0  # type: ignore[union-attr]
        started = time.monotonic()
        while True:  # new requests are refused once the change reaches this replica (auth cache TTL)
            try:
                await client.embed(["still there?"])
            except ApiError as exc:
                assert exc.code == "PERMISSION_DENIED"
                break
            assert time.monotonic() - started < 5.0
        refused = await http.post("/v1/embed", json=EMBED, headers=bearer(key))
        assert refused.status_code == 403


async def test_plan_limits_models_ip_and_headers(grpc_target: str, http_base: str, store: PartnerStore) -> None:
    store.put_plan(Plan("embed-only", requests_per_minute=3, tokens_per_minute=10_000, allowed_models=("minilm-l6",)))
    store.put_plan(Plan("office-only", ip_allowlist=("10.0.0.0/8",)))
    _, key = new_partner(store, plan="embed-only")
    _, office_key = new_partner(store, plan="office-only")
    async with httpx.AsyncClient(base_url=http_base) as http:
        ok = await http.post("/v1/embed", json=EMBED, headers=bearer(key))
        assert ok.headers["x-ratelimit-limit-requests"] == "3"
        assert ok.headers["x-ratelimit-remaining-requests"] == "2"
        assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s") and ok.headers["x-request-id"]
        other_model = await http.post(
            "/v1/classify", json={"model": "zero-shot", "texts": ["x"], "labels": ["a"]}, headers=bearer(key)
        )
        assert other_model.status_code == 403 and other_model.json()["error"]["param"] == "model"
        assert (await http.post("/v1/embed", json=EMBED, headers=bearer(key))).status_code == 200
        assert (await http.post("/v1/embed", json=EMBED, headers=bearer(key))).status_code == 200
        limited = await http.post("/v1/embed", json=EMBED, headers=bearer(key))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        outside = await http.post("/v1/embed", json=EMBED, headers=bearer(office_key))
        assert outside.status_code == 403 and "allowlist" in outside.json()["error"]["message"]
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        embed = channel.unary_unary(
            "/serving.v1.InferenceService/Embed",
            request_serializer=inference_pb2.EmbedRequest.SerializeToString,
            response_deserializer=inference_pb2.EmbedResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await embed(inference_pb2.EmbedRequest(model="minilm-l6", texts=["x"]), metadata=bearer(key).items())
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = {detail.type_url.rsplit(".", 1)[-1] for detail in status.details}
    assert {"QuotaFailure", "RetryInfo"} <= kinds
    failure = error_details_pb2.QuotaFailure()
    next(d for d in status.details if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR)).Unpack(failure)
    assert failure.violations[0].subject == "requests"
    trailing = dict(error.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 1


async def test_x_request_id_only_correlates(http_base: str, store: PartnerStore) -> None:
    """``x-request-id`` is a correlation id: two calls with one value both run and are both billed, under ids of
    their own; it is never an idempotency key."""
    _, key = new_partner(store)
    correlation = f"trace-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=http_base, headers=bearer(key) | {"x-request-id": correlation}) as http:
        replies = [await http.post("/v1/embed", json=EMBED) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    ids = {r.json()["request_id"] for r in replies}
    assert len(ids) == 2 and correlation not in ids and "idempotent-replayed" not in replies[1].headers
