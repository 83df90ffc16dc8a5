"""The quota backends against their contract: in-process and real Redis, exact sliding windows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from conftest import REDIS_URL

from serving.domain import Caller
from serving.errors import QuotaExceeded, Unavailable
from serving.plans import Plan
from serving.quota.limiter import BUCKET_S, WINDOW_S, QuotaBackend
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota


@pytest_asyncio.fixture(params=["memory", "redis"], loop_scope="session")
async def quota(request: pytest.FixtureRequest) -> AsyncIterator[QuotaBackend]:
    backend: QuotaBackend = MemoryQuota() if request.param == "memory" else RedisQuota(REDIS_URL)
    yield backend
    await backend.close()


def caller(**limits: int) -> Caller:
    return Caller(partner_id=f"p_{uuid.uuid4().hex[:12]}", key_id="k", plan=Plan("t", **limits))  # type: ignore[arg-type]


async def test_requests_per_minute_is_exact(quota: QuotaBackend) -> None:
    who = caller(requests_per_minute=5)
    reservations = [await quota.reserve(who, uuid.uuid4().hex, 1) for _ in range(5)]
    assert [r.limits.remaining_requests for r in reservations if r.limits] == [4, 3, 2, 1, 0]
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, uuid.uuid4().hex, 1)
    # It counts until its bucket's end plus the window: at most one bucket later than a per-request log.
    assert caught.value.param == "requests" and 0 < (caught.value.retry_after_s or 0) <= WINDOW_S + BUCKET_S


async def test_tokens_are_reserved_then_settled(quota: QuotaBackend) -> None:
    who = caller(tokens_per_minute=100)
    first = await quota.reserve(who, uuid.uuid4().hex, 80)  # estimate: prompt + max_tokens
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, uuid.uuid4().hex, 30)
    assert caught.value.param == "tokens"
    await quota.settle(first, 50)  # actual use: 30 refunded
    second = await quota.reserve(who, uuid.uuid4().hex, 30)
    assert second.limits is not None and second.limits.remaining_tokens == 20
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, uuid.uuid4().hex, 101)
    assert caught.value.param == "tokens_request"


async def test_concurrency_and_monthly_budget(quota: QuotaBackend) -> None:
    who = caller(max_concurrent=2)
    held = [await quota.reserve(who, uuid.uuid4().hex, 1) for _ in range(2)]
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, uuid.uuid4().hex, 1)
    assert caught.value.param == "concurrency"
    await quota.settle(held[0], 1)
    await quota.reserve(who, uuid.uuid4().hex, 1)

    budget = caller(monthly_tokens=10)
    spent = await quota.reserve(budget, uuid.uuid4().hex, 10)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(budget, uuid.uuid4().hex, 1)
    assert caught.value.param == "monthly_tokens"
    await quota.settle(spent, 4)
    await quota.reserve(budget, uuid.uuid4().hex, 6)


async def test_unreachable_redis_fails_closed_by_default_or_open_when_configured() -> None:
    dead = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    closed = RedisQuota(dead, timeout_s=0.2)
    with pytest.raises(Unavailable) as caught:
        await closed.reserve(caller(requests_per_minute=1), "r", 1)
    assert caught.value.retry_after_s
    await closed.close()

    admitted: list[int] = []
    fail_open = RedisQuota(dead, fail_open=True, on_fail_open=lambda: admitted.append(1), timeout_s=0.2)
    reservation = await fail_open.reserve(caller(requests_per_minute=1), "r", 1)
    assert reservation.limits is None and admitted == [1]
    await fail_open.settle(reservation, 1)
    await fail_open.close()
