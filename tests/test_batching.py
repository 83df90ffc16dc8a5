"""Batching is real: concurrent requests reach the replica together, shown by the replica's own counter.

Deterministic: the micro-batch flushes only on size (its deadline is far away), so exactly N concurrent
single-text requests cross the Ray boundary as one call of N items.
"""

from __future__ import annotations

import asyncio
from typing import Any

from serving.domain import EmbedRequest
from serving.gateway.app import build_routes
from serving.gateway.core import CallContext, Core
from serving.gateway.router import Router
from serving.idempotency.keys import IdempotencyKeys
from serving.idempotency.store import MemoryIdempotency
from serving.metering.record import UsageRecord
from serving.models.registry import ModelSpec
from serving.observability.metrics import Metrics
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.quota.admission import Admission
from serving.quota.memory import MemoryQuota
from serving.settings import Batching, Settings

N = 6


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)

    def seen(self, partner_id: str, request_id: str) -> bool:
        return any(r.partner_id == partner_id and r.request_id == request_id for r in self.records)


async def test_concurrent_requests_reach_the_replica_as_one_batch(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore, api_key: str
) -> None:
    router = Router(
        build_routes(specs, ray_models, settings.models_cache),
        Batching(max_batch_size=N, max_wait_ms=600_000, max_inflight=0),
    )
    sink = ListSink()
    admission = Admission(MemoryQuota(), specs, settings.admission)
    keys = IdempotencyKeys(MemoryIdempotency(60.0, 1 << 20, 60.0), sink.seen)
    core = Core(Authenticator(store, 5.0), router, settings.limits, Metrics(), admission, sink, lambda *_: [], keys)
    route = router.routes["minilm-l6"]
    before = await route.batch_stats()

    results = await asyncio.gather(
        *(core.embed(CallContext(api_key), EmbedRequest("minilm-l6", [f"sentence number {i}"])) for i in range(N))
    )

    after = await route.batch_stats()
    assert all(len(r.embeddings) == 1 for r in results)
    grown = {size: n - before["sizes"].get(size, 0) for size, n in after["sizes"].items()}
    grown = {size: n for size, n in grown.items() if n}
    assert grown == {N: 1}, f"replica batches before={before['sizes']} after={after['sizes']}"
    assert after["items"] - before["items"] == N
    assert [r.status for r in sink.records] == ["ok"] * N
