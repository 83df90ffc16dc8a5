"""What a prepaid plan adds to admission, side by side: ``Admission.reserve`` then ``settle_soon`` for a metered plan
and for a prepaid plan (the quota's reservation plus the wallet's hold, then both settlements), on the in-process
stores and on Redis (quota and wallet sharing one ``RedisBatch``, as in a gateway). Requests go in waves of
``--concurrency`` at once, as a busy gateway admits them; CPU time per admission (``time.process_time``: this
process) and, for the Redis rows, the Redis server's CPU per admission (``INFO cpu``), medians of alternating rounds.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench_prepaid.py [--admissions 20000] [--rounds 5]

The whole-request figure is the ``prepaid plan`` row of ``bench.py --rows cpu`` (too noisy on 2 cores to resolve a
difference this size). It also prints the RESP encoding of one batch the size these waves send (the gateway's
``serving.storage.resp.encode``, hiredis' C packer, beside the Python loop it replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import redis.asyncio as aioredis

from serving.commerce.credits import CreditStore
from serving.commerce.prepaid import Prepaid
from serving.commerce.pricebook import PriceBook
from serving.commerce.redis_wallet import RedisWallet
from serving.commerce.wallet import MemoryWallet, Wallet
from serving.domain import Caller, Usage
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.quota.admission import Admission
from serving.quota.limiter import QuotaBackend
from serving.quota.memory import MemoryQuota
from serving.quota.redis_quota import RedisQuota
from serving.settings import Admission as AdmissionSettings
from serving.storage.database import Database
from serving.storage.redis_batch import RedisBatch
from serving.storage.resp import encode

LIMITS = Plan("limits", requests_per_minute=10**9, tokens_per_minute=10**12, monthly_tokens=10**15)  # checked, not hit
MODEL = "minilm-l6"  # priced in the shipped book


async def redis_cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def per_admission(admission: Admission, caller: Caller, count: int, concurrency: int) -> float:
    """CPU µs (this process) per reserve + settle, ``concurrency`` admissions at a time."""

    async def one() -> None:
        reservation = await admission.reserve(caller, MODEL, 12)
        admission.settle_soon(reservation, Usage(12, 0))

    started = time.process_time()
    for _ in range(count // concurrency):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    await admission.drain()
    return (time.process_time() - started) * 1e6 / (count // concurrency * concurrency)


def python_encode(args: tuple[object, ...]) -> bytes:
    """The RESP packer the gateway used before ``hiredis.pack_command`` (the baseline of the encode row)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def encode_row(operations: int) -> str:
    """µs to encode one EVALSHA batch of ``operations`` quota reservations (their keys and arguments)."""
    op = ("quota_reserve", 4, 12, 1796400000000, 60000, 100, 17964000000, uuid.uuid4().hex, 600, 200000, 32, 90000, 12)
    keys = [f"quota:{{p_{i:012d}}}:{part}" for i in range(operations) for part in ("win", "bkt", "lease", "month")]
    args = ("EVALSHA", "f" * 40, len(keys), *keys, operations, *(op * operations))
    if python_encode(args) != encode(args):
        raise AssertionError("the two encoders disagree")
    rounds = 2000
    timings = {}
    for name, fn in (("python", python_encode), ("hiredis", encode)):
        started = time.process_time()
        for _ in range(rounds):
            fn(args)
        timings[name] = (time.process_time() - started) * 1e6 / rounds
    python, hiredis = timings["python"], timings["hiredis"]
    what = f"RESP encode of one {operations}-operation batch ({len(args)} arguments)"
    return f"{what}: Python loop {python:.1f} µs, hiredis {hiredis:.1f} µs ({hiredis / python:.2f} ×)"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admissions", type=int, default=20_000, help="admissions per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is printed")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = PartnerStore(Database(str(Path(tmp) / "partners.db")))
        book, credits = PriceBook.load(None), CreditStore(store.db)
        callers = {}
        for name, is_prepaid in (("metered", False), ("prepaid", True)):
            plan = LIMITS.with_changes(name=f"bench-{name}", prepaid=is_prepaid)
            store.put_plan(plan)
            created = store.create_partner(f"bench-{name}-{uuid.uuid4().hex[:6]}", plan=plan.name)
            credits.grant(created.id, "purchased", Decimal("1000000.00"))
            callers[name] = Caller(created.id, "k", plan)
        batch = RedisBatch(args.redis_url, timeout_s=2.0)
        redis = aioredis.Redis.from_url(args.redis_url)
        backends: dict[str, tuple[QuotaBackend, Wallet]] = {
            "memory": (MemoryQuota(lease_s=90.0), MemoryWallet(600.0)),
            "redis": (RedisQuota(batch, lease_s=90.0), RedisWallet(batch, lease_s=600.0)),
        }
        results: dict[tuple[str, str], list[float]] = {}
        redis_results: dict[str, list[float]] = {}
        try:
            for store_name, (quota, wallet) in backends.items():
                admission = Admission(
                    quota, [], AdmissionSettings(), prepaid=Prepaid(book, credits, wallet, ttl_s=3600.0)
                )
                for caller in callers.values():  # warm: caches, the scripts loaded
                    await per_admission(admission, caller, args.concurrency * 10, args.concurrency)
                for _ in range(args.rounds):
                    for name, caller in callers.items():
                        before = await redis_cpu_s(redis)
                        us = await per_admission(admission, caller, args.admissions, args.concurrency)
                        results.setdefault((store_name, name), []).append(us)
                        if store_name == "redis":
                            spent = (await redis_cpu_s(redis) - before) * 1e6 / args.admissions
                            redis_results.setdefault(name, []).append(spent)
        finally:
            for caller in callers.values():
                for pattern in (f"quota:{{{caller.partner_id}}}:*", f"wallet:{{{caller.partner_id}}}:*"):
                    keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
                    if keys:
                        await redis.delete(*keys)
            await redis.aclose()
            await batch.close()
            store.close()
    print(f"admission (reserve + settle), {args.admissions} per round, concurrency {args.concurrency}, median of "
          f"{args.rounds} rounds; µs CPU per admission")  # fmt: skip
    print("| stores | metered plan | prepaid plan | prepaid ÷ metered | Redis server, metered → prepaid |")
    print("|---|---:|---:|---:|---:|")
    for store_name in backends:
        metered = statistics.median(results[(store_name, "metered")])
        held = statistics.median(results[(store_name, "prepaid")])
        server = "-"
        if store_name == "redis":
            server = (
                f"{statistics.median(redis_results['metered']):.1f} → {statistics.median(redis_results['prepaid']):.1f}"
            )
        print(f"| {store_name} | {metered:.1f} | {held:.1f} | {held / metered:.2f} | {server} |")
    print(encode_row(2 * args.concurrency))


if __name__ == "__main__":
    asyncio.run(main())
