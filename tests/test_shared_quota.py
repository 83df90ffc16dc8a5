"""Quota holds across gateway replicas that share Redis, and a tokens-per-minute limit holds for
generations whose cost is known only at the end."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from conftest import REDIS_URL, running_gateway

from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import Settings
from serving_sdk import ApiError, AsyncClient

LIMIT = 40
ATTEMPTS = 120
WITHIN = 30  # requests sent first, all within the limit


async def test_two_replicas_share_one_requests_per_minute_limit(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore
) -> None:
    plan = f"rpm-{uuid.uuid4().hex[:6]}"
    store.put_plan(Plan(plan, requests_per_minute=LIMIT))
    partner = store.create_partner(f"hammer-{uuid.uuid4().hex[:8]}", plan=plan)
    key = store.issue_key(partner.id)
    async with (
        running_gateway(settings, specs, ray_models, store, redis_url=REDIS_URL, gateway_id="shared-1") as one,
        running_gateway(settings, specs, ray_models, store, redis_url=REDIS_URL, gateway_id="shared-2") as two,
        httpx.AsyncClient(headers={"authorization": f"Bearer {key}"}) as http,
    ):
        bases = [f"http://127.0.0.1:{gw.http_port}" for gw in (one, two)]
        body = {"model": "minilm-l6", "texts": ["quota test"]}

        async def wave(count: int) -> list[int]:  # alternating between the replicas, all at once
            replies = await asyncio.gather(*(http.post(f"{bases[i % 2]}/v1/embed", json=body) for i in range(count)))
            assert {r.status_code for r in replies} <= {200, 429}, [r.text for r in replies][:3]
            return [r.status_code for r in replies]

        # Under the limit: every request of both replicas is admitted (each replica takes part of the one budget).
        first = await wave(WITHIN)
        # Then a burst across the boundary, racing on both replicas: only what is left of the budget gets in.
        burst = await wave(ATTEMPTS - WITHIN)
    accepted = first.count(200) + burst.count(200)
    print(f"limit {LIMIT}/min over 2 replicas: accepted {accepted}, rejected {burst.count(429)} of {ATTEMPTS}")
    assert first == [200] * WITHIN
    assert burst.count(200) == LIMIT - WITHIN and accepted == LIMIT  # overshoot 0


async def _generate(target: str, key: str, i: int) -> int | str:
    async with AsyncClient(target, key) as client:
        try:
            result = await client.generate(f"Name a fruit number {i}.", temperature=0.0, max_tokens=24)
        except ApiError as exc:
            return exc.code
    return result.usage.input_tokens + result.usage.output_tokens


async def test_tokens_per_minute_holds_for_generation(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore
) -> None:
    budget = 400
    plan = f"tpm-{uuid.uuid4().hex[:6]}"
    store.put_plan(Plan(plan, tokens_per_minute=budget))
    partner = store.create_partner(f"writer-{uuid.uuid4().hex[:8]}", plan=plan)
    key = store.issue_key(partner.id)
    async with running_gateway(settings, specs, ray_models, store, redis_url=REDIS_URL, gateway_id="tpm-1") as gw:
        outcomes = [await _generate(f"127.0.0.1:{gw.grpc_port}", key, i) for i in range(12)]  # one at a time
    used = [o for o in outcomes if isinstance(o, int)]
    rejected = [o for o in outcomes if not isinstance(o, int)]
    print(f"tpm {budget}: served {len(used)} generations using {sum(used)} tokens; rejected {len(rejected)}")
    assert sum(used) <= budget
    assert rejected and set(rejected) == {"RESOURCE_EXHAUSTED"}
    # Settling refunds unused max_tokens, so more fit than the worst-case estimate alone would allow.
    estimate = max(used) + 24  # an upper bound of one request's reservation
    assert len(used) >= budget // estimate
