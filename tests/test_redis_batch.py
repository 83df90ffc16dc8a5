"""One Redis round trip per event-loop turn: quota reservations, settlements and idempotency claims made in the same
turn go to Redis as one script call, applied in arrival order, and the windows' memory stays bounded per partner
whatever the rate. Real Redis; the quota's clock is a fake one so that minutes pass at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from conftest import REDIS_URL
from redis.exceptions import ResponseError

from serving.domain import Caller
from serving.errors import QuotaExceeded
from serving.idempotency.redis_store import RedisIdempotency
from serving.plans import Plan
from serving.quota.limiter import BUCKET_S, WINDOW_S, QuotaBackend, Reservation, bucket_of
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota
from serving.storage.redis_batch import RedisBatch
from serving.storage.resp import Endpoint, RespConnection


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def caller(**limits: int) -> Caller:
    return Caller(partner_id=f"p_{uuid.uuid4().hex[:12]}", key_id="k", plan=Plan("t", **limits))  # type: ignore[arg-type]


@pytest_asyncio.fixture(loop_scope="session")
async def batch() -> AsyncIterator[RedisBatch]:
    shared = RedisBatch(REDIS_URL, timeout_s=2.0)
    yield shared
    await shared.close()


async def attempt(quota: QuotaBackend, who: Caller, tokens: int = 1) -> Reservation | None:
    try:
        return await quota.reserve(who, uuid.uuid4().hex, tokens)
    except QuotaExceeded:
        return None


async def test_a_turn_of_reservations_is_one_round_trip_in_arrival_order(batch: RedisBatch) -> None:
    quota = RedisQuota(batch, timeout_s=2.0)
    who = caller(requests_per_minute=150)
    before = batch.batches
    results = await asyncio.gather(*(attempt(quota, who) for _ in range(200)))  # all made in one turn
    assert batch.batches - before == 1
    admitted = [r is not None for r in results]
    assert admitted == [True] * 150 + [False] * 50  # arrival order: the first 150 got in, no more

    # Settlements of that turn and the next reservations share round trips too, and stay exact.
    before = batch.batches
    await asyncio.gather(*(quota.settle(r, 0) for r in results if r is not None))
    assert batch.batches - before == 1
    assert await attempt(quota, who) is None  # settling refunds tokens, never the request count


async def test_settlements_ride_with_the_next_reservation_and_land_before_it(batch: RedisBatch) -> None:
    quota = RedisQuota(batch, timeout_s=2.0)
    who = caller(max_concurrent=1)
    held = await attempt(quota, who)
    assert held is not None and await attempt(quota, who) is None  # the one slot is taken
    before = batch.batches
    # The settlement opens no round trip: the reservation made right after it carries both, settlement first.
    _, again = await asyncio.gather(quota.settle(held, 1), attempt(quota, who))
    assert again is not None and batch.batches - before == 1
    before = batch.batches
    await quota.settle(again, 1)  # alone: it leaves after at most LAZY_S
    assert batch.batches - before == 1
    assert await attempt(quota, who) is not None


async def test_quota_and_idempotency_claims_share_the_round_trip(batch: RedisBatch) -> None:
    quota = RedisQuota(batch, timeout_s=2.0)
    keys = RedisIdempotency(batch, ttl_s=60.0, max_bytes=1024, running_ttl_s=30.0)
    who = caller(requests_per_minute=10)
    key = uuid.uuid4().hex
    before = batch.batches
    claims = await asyncio.gather(
        keys.begin(who.partner_id, key, "fp"),
        attempt(quota, who),
        keys.begin(who.partner_id, key, "fp"),  # the same key again, later in the same turn
    )
    assert batch.batches - before == 1
    assert claims[0].state == "new" and claims[1] is not None and claims[2].state == "in_progress"


async def run_minutes(
    quota: QuotaBackend, clock: Clock, who: Caller, step_s: float, minutes: float, per_step: int
) -> list[float]:
    """``per_step`` attempts every ``step_s`` of fake time; the times of the admitted ones."""
    admitted: list[float] = []
    steps = int(minutes * 60 / step_s)
    for _ in range(steps):
        results = await asyncio.gather(*(attempt(quota, who) for _ in range(per_step)))
        admitted += [clock.now] * sum(r is not None for r in results)
        clock.now += step_s
    return admitted


def most_in_any_window(times: list[float]) -> int:
    most, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - WINDOW_S:
            start += 1
        most = max(most, end - start + 1)
    return most


QuotaFactory = Callable[[Clock], QuotaBackend]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_no_minute_holds_more_than_the_limit_and_almost_all_of_it_is_usable(
    backend: str, batch: RedisBatch
) -> None:
    clock = Clock()
    quota: QuotaBackend = MemoryQuota(clock) if backend == "memory" else RedisQuota(batch, timeout_s=2.0, clock=clock)
    who = caller(requests_per_minute=50)
    admitted = await run_minutes(quota, clock, who, step_s=0.05, minutes=4, per_step=1)
    assert most_in_any_window(admitted) == 50  # never more, in any 60-second span
    # Buckets free their requests at most one bucket late: at most one step's request lost per minute.
    assert len(admitted) >= 4 * 50 - 4 * int(BUCKET_S / 0.05)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_window_memory_is_bounded_whatever_the_rate(backend: str, batch: RedisBatch) -> None:
    """100,000 requests a minute: the window holds one count per bucket, not one entry per request."""
    clock = Clock()
    quota: QuotaBackend = MemoryQuota(clock) if backend == "memory" else RedisQuota(batch, timeout_s=2.0, clock=clock)
    who = caller(requests_per_minute=200_000, tokens_per_minute=10**9)
    # 1.2 minutes at 100,000 requests per minute of fake time: 120,000 requests.
    admitted = await run_minutes(quota, clock, who, step_s=0.15, minutes=1.2, per_step=250)
    assert len(admitted) == 120_000
    buckets = int(WINDOW_S / BUCKET_S) + 2
    if isinstance(quota, MemoryQuota):
        state: Any = quota._state[who.partner_id]  # the store's own bookkeeping
        assert len(state.buckets) <= buckets
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            tag = f"quota:{{{who.partner_id}}}"
            assert await client.zcard(f"{tag}:bkt") <= buckets
            assert await client.hlen(f"{tag}:win") <= 2 * buckets + 2
            # What still counts at the last reservation: buckets from the one the window's start falls in.
            last_ms, bucket_ms = int((clock.now - 0.15) * 1000), int(BUCKET_S * 1000)
            first = (last_ms - int(WINDOW_S * 1000)) // bucket_ms
            assert int(await client.hget(f"{tag}:win", "r") or 0) == sum(bucket_of(t) >= first for t in admitted)
        finally:
            await client.aclose()


def test_redis_urls_parse_like_redis_py() -> None:
    assert Endpoint.parse("redis://127.0.0.1:6390/2") == Endpoint("127.0.0.1", 6390, 2, None, None, False)
    assert Endpoint.parse("rediss://app:s%40cret@cache.internal") == Endpoint(
        "cache.internal", 6379, 0, "app", "s@cret", True
    )
    with pytest.raises(ValueError, match="redis://"):
        Endpoint.parse("http://127.0.0.1:6379")


async def test_the_connection_selects_the_database_of_its_url() -> None:
    connection = RespConnection(REDIS_URL.rsplit("/", 1)[0] + "/3", timeout_s=2.0)
    key = f"resp-test:{uuid.uuid4().hex}"
    try:
        assert await connection.call("SET", key, "on db 3", "PX", 60_000) == b"OK"
        with pytest.raises(ResponseError, match="unknown command"):
            await connection.call("NO-SUCH-COMMAND")
        assert await connection.call("GET", key) == b"on db 3"  # an error reply leaves the connection usable
    finally:
        connection.close()
    client = aioredis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/3")
    try:
        assert await client.get(key) == b"on db 3"
    finally:
        await client.aclose()
