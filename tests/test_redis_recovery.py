"""Redis goes away and comes back: fail-closed answers during the outage, service again right after the restart,
concurrency leases that expire when their settlement never arrives or settle late (once) when Redis answers
again, and a usage ledger that holds every served request exactly once.

Each test runs its own redis-server (no persistence) on a free port, so it can kill, pause and restart it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from conftest import running_gateway
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from serving.domain import Caller
from serving.errors import QuotaExceeded, Unavailable
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.quota.limiter import QuotaBackend, month_of
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota
from serving.settings import Settings
from serving_sdk.v1 import inference_pb2

MAX_CONCURRENT = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server without persistence on one port, that the test kills, pauses and starts again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Returns once the server answers PING: it logs its readiness once it listens, or exits (EOF)."""
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [*args, "--dir", str(self.directory)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        log: list[str] = []
        for line in process.stdout:
            log.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            process.wait()
            raise RuntimeError("redis-server did not start:\n" + "".join(log))
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keeps its log pipe from filling up
        self.process = process
        with redis.Redis(port=self.port, socket_timeout=5) as client:
            assert client.ping()

    def kill(self) -> None:
        """SIGKILL: every window, lease and counter it held is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections still open, no answers (a hung server or a network partition)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.kill()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def caller(**limits: int) -> Caller:
    return Caller(partner_id=f"p_{uuid.uuid4().hex[:12]}", key_id="k", plan=Plan("t", **limits))  # type: ignore[arg-type]


async def settled(quota: RedisQuota) -> None:
    """The background settle retries have ended (bounded: they back off to at most 5 s between attempts)."""
    async with asyncio.timeout(30):
        await quota.settled()
    assert quota.pending_settles == 0


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_lease_whose_settle_never_arrives_expires(backend: str, redis_server: RedisServer) -> None:
    clock = Clock()
    quota: QuotaBackend = (
        MemoryQuota(clock, lease_s=5.0)
        if backend == "memory"
        else RedisQuota(redis_server.url, lease_s=5.0, clock=clock)
    )
    who = caller(max_concurrent=1)
    await quota.reserve(who, "orphan", 1)  # its gateway is killed: no settlement ever arrives
    clock.now += 4.99
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, "early", 1)
    assert caught.value.param == "concurrency"
    clock.now += 0.02  # past the lease lifetime: the slot is free again
    await quota.reserve(who, "next", 1)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, "one-too-many", 1)
    assert caught.value.param == "concurrency"  # the limit itself still holds
    await quota.close()


async def test_a_settle_lost_to_a_hung_redis_lands_once_when_it_answers_again(redis_server: RedisServer) -> None:
    quota = RedisQuota(redis_server.url, timeout_s=0.3, lease_s=60.0)
    who = caller(max_concurrent=2)
    first = await quota.reserve(who, "a", 10)
    await quota.reserve(who, "b", 10)
    redis_server.pause()
    await quota.settle(first, 4)  # no answer: left to the background retries (Redis may still apply this one)
    assert quota.pending_settles == 1
    with pytest.raises(Unavailable) as unavailable:
        await quota.reserve(who, "c", 10)  # fail closed; Redis may apply it late, so it is released the same way
    assert unavailable.value.retry_after_s == 1.0
    assert quota.pending_settles == 2
    redis_server.resume()
    await settled(quota)

    await quota.reserve(who, "d", 10)  # a's slot is free (and c's, had it landed): b and d hold the two slots
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, "e", 10)
    assert caught.value.param == "concurrency"
    tag = f"quota:{{{who.partner_id}}}"
    with redis.Redis(port=redis_server.port) as client:
        month = int(client.get(f"{tag}:month:{month_of(time.time())}") or 0)
        late_reservations = int(client.zcard(f"{tag}:req")) - 3  # a, b, d; 1 if c was applied after the pause
        leases = sorted(m.decode() for m in client.zrange(f"{tag}:lease", 0, -1))
    print(f"after the pause: month tokens {month}, late reservations applied {late_reservations}, leases {leases}")
    assert leases == ["b", "d"]
    assert month == 10 + 4 + 10  # a refunded once (a repeated settlement changes nothing), c released, b and d held
    await quota.close()


async def test_a_restart_between_calls_costs_no_failed_call(redis_server: RedisServer) -> None:
    """Pooled connections broken by the restart are replaced on first use; the lost scripts are loaded again."""
    quota = RedisQuota(redis_server.url)
    who = caller(max_concurrent=8)
    held = await asyncio.gather(*(quota.reserve(who, f"before-{i}", 1) for i in range(8)))  # 8 pooled connections
    redis_server.kill()
    redis_server.start()
    after = await asyncio.gather(*(quota.reserve(who, f"after-{i}", 1) for i in range(8)))
    assert [r.limits is not None for r in after] == [True] * 8  # no Unavailable: the restarted Redis starts empty
    await asyncio.gather(*(quota.settle(r, 1) for r in held))  # leases the restart lost: nothing to free
    assert quota.pending_settles == 0
    with pytest.raises(QuotaExceeded):
        await quota.reserve(who, "ninth", 1)
    await quota.close()


async def test_a_reservation_or_settlement_sent_twice_counts_once(redis_server: RedisServer) -> None:
    """What makes retrying safe when a reply is lost: both scripts are idempotent per reservation id."""
    quota = RedisQuota(redis_server.url)
    who = caller(requests_per_minute=5, monthly_tokens=20)
    first = await quota.reserve(who, "x", 10)
    again = await quota.reserve(who, "x", 10)
    assert first.limits is not None and again.limits is not None
    assert (first.limits.remaining_requests, again.limits.remaining_requests) == (4, 4)
    await quota.settle(first, 4)
    await quota.settle(first, 4)  # refunds 6 once: 4 of the 20 monthly tokens used
    await quota.reserve(who, "y", 16)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.reserve(who, "z", 1)
    assert caught.value.param == "monthly_tokens"
    await quota.close()


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _check_unavailable(error: grpc.aio.AioRpcError) -> None:
    """UNAVAILABLE carries retry-after in trailing metadata and a google.rpc.RetryInfo of 1 s."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert dict(error.trailing_metadata() or ())["retry-after"] == "1"
    status = rpc_status.from_call(error)
    assert status is not None
    detail = next(d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
    info = error_details_pb2.RetryInfo()
    detail.Unpack(info)
    assert info.retry_delay.ToMilliseconds() == 1000


async def test_gateway_fails_closed_while_redis_is_down_and_recovers_after_restart(
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    store: PartnerStore,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = Plan(f"conc-{uuid.uuid4().hex[:6]}", max_concurrent=MAX_CONCURRENT)
    store.put_plan(plan)
    partner = store.create_partner(f"redis-recovery-{uuid.uuid4().hex[:8]}", plan=plan.name)
    key = store.issue_key(partner.id)
    outcomes: dict[str, str] = {}  # request id -> gRPC status name or HTTP status
    overrides = {"redis_url": redis_server.url, "redis_timeout_s": 0.5, "gateway_id": "redis-recovery"}
    async with (
        running_gateway(settings, specs, ray_models, store, **overrides) as gw,
        grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.http_port}", headers={"authorization": f"Bearer {key}"}
        ) as http,
    ):
        quota = gw.quota
        assert isinstance(quota, RedisQuota)
        embed = channel.unary_unary(
            "/serving.v1.InferenceService/Embed",
            request_serializer=inference_pb2.EmbedRequest.SerializeToString,
            response_deserializer=inference_pb2.EmbedResponse.FromString,
        )

        async def grpc_embed(request_id: str) -> str:
            message = inference_pb2.EmbedRequest(
                model="minilm-l6", texts=[f"redis {request_id}"], request_id=request_id
            )
            try:
                reply = await embed(message, metadata=_bearer(key), timeout=30)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    _check_unavailable(error)
                outcomes[request_id] = error.code().name
                return outcomes[request_id]
            assert reply.request_id == request_id
            outcomes[request_id] = "OK"
            return "OK"

        async def http_embed(request_id: str) -> str:
            body = {"model": "minilm-l6", "texts": [f"redis {request_id}"], "request_id": request_id}
            reply = await http.post("/v1/embed", json=body)
            if reply.status_code == 503:
                assert reply.headers["retry-after"] == "1"
                assert reply.json()["error"]["code"] == "unavailable"
            outcomes[request_id] = "OK" if reply.status_code == 200 else str(reply.status_code)
            return outcomes[request_id]

        async def wave(phase: str, count: int = MAX_CONCURRENT) -> list[str]:
            results = await asyncio.gather(*(grpc_embed(f"{phase}-{i}") for i in range(count)))
            await gw.core.drain()  # the wave's settlements were sent (or failed and were queued for retry)
            return results

        before = [*await wave("before-1"), *await wave("before-2")]
        assert before == ["OK"] * 2 * MAX_CONCURRENT

        # Mid-load: Redis dies as soon as two requests of this wave have their reservations.
        reserve = quota.reserve
        reserved: list[str] = []

        async def reserve_then_kill_redis(caller: Caller, reservation_id: str, tokens: int) -> Any:
            reservation = await reserve(caller, reservation_id, tokens)
            reserved.append(reservation_id)
            if len(reserved) == 2:
                redis_server.kill()
            return reservation

        monkeypatch.setattr(quota, "reserve", reserve_then_kill_redis)
        mid = await wave("mid")
        monkeypatch.setattr(quota, "reserve", reserve)
        assert set(mid) <= {"OK", "UNAVAILABLE"} and mid.count("OK") == len(reserved) >= 2, mid
        assert quota.pending_settles == mid.count("OK")  # served, but Redis was gone when they ended

        during = await wave("during")
        during_http = await asyncio.gather(*(http_embed(f"during-http-{i}") for i in range(MAX_CONCURRENT)))
        assert during == ["UNAVAILABLE"] * MAX_CONCURRENT
        assert during_http == ["503"] * MAX_CONCURRENT

        await asyncio.to_thread(redis_server.start)  # the same port; every window and lease is gone
        restarted = time.perf_counter()
        for attempts in range(1, 6):  # one request at a time until one is served
            if await grpc_embed(f"recovery-{attempts}") == "OK":
                break
        recovery_s = time.perf_counter() - restarted
        assert outcomes[f"recovery-{attempts}"] == "OK"

        await gw.core.drain()
        after = await wave("after")  # every slot is free: nothing leaked
        assert after == ["OK"] * MAX_CONCURRENT
        assert await http_embed("after-http") == "OK"
        await settled(quota)  # the late settlements found no lease: no-ops

        # The limit still holds after the restart: with every slot held, the next request is refused.
        held_by = Caller(partner_id=partner.id, key_id="held", plan=plan)
        held = [await quota.reserve(held_by, f"held-{i}", 1) for i in range(MAX_CONCURRENT)]
        assert await grpc_embed("over-limit") == "RESOURCE_EXHAUSTED"
        for reservation in held:
            await quota.settle(reservation, 1)
        assert await wave("after-release") == ["OK"] * MAX_CONCURRENT

        await asyncio.to_thread(gw.ledger.flush)
        rows = gw.ledger.db.query(
            "SELECT request_id, COUNT(*) FROM usage_records WHERE partner_id = ? GROUP BY request_id", (partner.id,)
        )
    ledger = {str(request_id): int(count) for request_id, count in rows}
    served = {request_id for request_id, outcome in outcomes.items() if outcome == "OK"}
    refused = set(outcomes) - served
    served_after = sum(1 for request_id in served if request_id.startswith(("recovery", "after")))
    print(
        f"redis restart: ok before {before.count('OK')}, mid-load ok {mid.count('OK')} / unavailable"
        f" {mid.count('UNAVAILABLE')}, during the outage unavailable {during.count('UNAVAILABLE')} gRPC +"
        f" {during_http.count('503')} HTTP, first ok after the restart at attempt {attempts} ({recovery_s:.3f} s),"
        f" ok after {served_after}; ledger rows {len(ledger)} = served {len(served)};"
        f" refused {len(refused)}, none in the ledger"
    )
    assert ledger == dict.fromkeys(served, 1)  # every acknowledged request once, no refused one
    assert not refused & set(ledger)
