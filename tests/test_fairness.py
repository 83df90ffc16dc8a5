"""Fair admission end to end: partner A floods a one-slot model over gRPC while partner B keeps two requests
outstanding. While B has a request waiting, the fair queue never gives A two slots in a row, and all of B's
requests succeed. With fair queuing switched off (``SERVING_ADMISSION_FAIR=0``: first come, first served) the
same record shows B waiting behind A's backlog.

The gateway runs in this test's event loop; each partner's client is a process of its own (this file run as a
script), so neither a client's event loop nor how much CPU it gets decides B's turn: the fair queue does. The
test asserts on the queue's record of its grants (events and counts), never on latency: B's latency alone and
under the flood is a benchmark row (``loadtests/bench_fairness.py``, BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from test_fairqueue import max_run_while_other_waits

if TYPE_CHECKING:
    from serving.models.registry import ModelSpec
    from serving.partners.store import PartnerStore
    from serving.quota.fairqueue import Grant
    from serving.settings import Settings

MODEL = "minilm-l6"
CAPACITY = 1  # requests in flight to the model per gateway; beyond it partners queue
FLOODERS = 10  # A keeps ten requests outstanding: ten times a fair share of the one slot
B_OUTSTANDING = 2  # so that B has a request waiting while its other one is served
TEXT = "A partner backend asks for an embedding of this ordinary sentence."
GUARD_S = 300.0  # only so that a hang fails instead of blocking CI; no assertion depends on time


# --- the clients: ``python tests/test_fairness.py flood|share TARGET API_KEY [REQUESTS]`` ---------------------


async def _client(role: str, target: str, api_key: str, requests: str = "0") -> None:
    """``flood``: FLOODERS closed-loop callers until stdin closes (then they are cancelled); prints ``FLOODING``
    once the first comes back, the other nine waiting behind it. ``share``: once the test writes a line to
    stdin, B_OUTSTANDING closed-loop callers send ``requests`` requests; prints ``RESULT {"ok": n, "failed": m}``.
    """
    from serving_sdk import ApiError, AsyncClient, RetryPolicy

    counts = {"ok": 0, "failed": 0}
    sent = 0

    async def caller(limit: int | None) -> None:
        nonlocal sent
        while limit is None or sent < limit:
            sent += 1
            try:
                await client.embed([f"{TEXT} ({sent})"], model=MODEL)
                counts["ok"] += 1
            except ApiError:
                counts["failed"] += 1
            if limit is None and counts["ok"] + counts["failed"] == 1:
                print("FLOODING", flush=True)

    # No retries: a request the gateway sheds counts as failed instead of coming back.
    async with AsyncClient(target, api_key, retry=RetryPolicy(attempts=1)) as client:
        if role == "flood":
            callers = [asyncio.create_task(caller(None)) for _ in range(FLOODERS)]
            await asyncio.to_thread(sys.stdin.read)  # the test closes stdin once B is done
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            return
        await asyncio.to_thread(sys.stdin.readline)
        await asyncio.gather(*(caller(int(requests)) for _ in range(B_OUTSTANDING)))
    print("RESULT " + json.dumps(counts), flush=True)


@asynccontextmanager
async def _client_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdin is not None
    try:
        yield process
    except BaseException:
        if process.returncode is None:
            process.kill()
        raise
    finally:
        process.stdin.close()
        await process.wait()


async def _read_until(process: asyncio.subprocess.Process, prefix: str) -> str:
    assert process.stdout is not None
    while line := (await process.stdout.readline()).decode():
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise AssertionError(f"client exited (code {await process.wait()}) before printing {prefix!r}")


# --- what the record shows --------------------------------------------------------------------------------


def _window(grants: list[Grant], partner: str) -> list[Grant]:
    """From ``partner``'s first grant to its last: the stretch in which both partners were sending."""
    mine = [i for i, grant in enumerate(grants) if grant.partner == partner]
    return grants[mine[0] : mine[-1] + 1] if mine else []


# --- the test ---------------------------------------------------------------------------------------------


# First come, first served needs only a few of B's requests to show B waiting behind A's backlog.
@pytest.mark.parametrize(("fair", "b_requests"), [(True, 12), (False, 4)], ids=["fair", "fifo"])
async def test_a_flood_does_not_starve_a_partner_sending_its_share(
    fair: bool,
    b_requests: int,
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    store: PartnerStore,
) -> None:
    from conftest import running_gateway

    partners = [store.create_partner(f"{who}-{uuid.uuid4().hex[:6]}", plan="unlimited") for who in "AB"]
    (a_id, a_key), (b_id, b_key) = ((p.id, store.issue_key(p.id)) for p in partners)
    one_slot = [
        replace(spec, admission=replace(spec.admission, max_concurrency=CAPACITY)) for spec in specs if spec.id == MODEL
    ]
    overrides: dict[str, Any] = {
        "gateway_id": f"fairness-{'fair' if fair else 'fifo'}-{uuid.uuid4().hex[:6]}",
        "admission": replace(settings.admission, fair=fair),
    }
    async with (
        asyncio.timeout(GUARD_S),
        running_gateway(settings, one_slot, ray_models, store, **overrides) as gw,
    ):
        target = f"127.0.0.1:{gw.grpc_port}"
        async with (
            _client_process("flood", target, a_key) as flood,
            _client_process("share", target, b_key, str(b_requests)) as share,
        ):
            await _read_until(flood, "FLOODING")  # A holds the slot and has a backlog in the queue
            assert share.stdin is not None
            share.stdin.write(b"go\n")
            await share.stdin.drain()
            b_counts = json.loads(await _read_until(share, "RESULT "))
        grants = gw.admission.recent_grants(MODEL)

    window = _window(grants, b_id)
    b_grants = [g for g in window if g.partner == b_id]
    a_grants = [g for g in window if g.partner == a_id]
    a_while_b_waited = sum(g.others_waiting > 0 for g in a_grants)
    b_while_a_waited = sum(g.others_waiting > 0 for g in b_grants)
    run = max_run_while_other_waits(grants, b_id)
    print(
        f"{'fair' if fair else 'fifo'}: B {b_counts}; in B's window {len(b_grants)} grants to B, {len(a_grants)} "
        f"to A ({a_while_b_waited} while B waited); A waited at {b_while_a_waited} of B's grants; "
        f"most A grants in a row while B waited: {run}"
    )
    assert {g.partner for g in grants} == {a_id, b_id}
    assert b_counts["ok"] + b_counts["failed"] == b_requests
    assert len(b_grants) == b_counts["ok"]  # each of B's requests that got through was admitted once
    # The flood was real: A had requests waiting when most of B's requests got the slot.
    assert b_while_a_waited >= len(b_grants) // 2
    if fair:
        assert b_counts == {"ok": b_requests, "failed": 0}
        assert run <= 1  # while B waits, the slot alternates: at most one A grant between two of B's
        assert a_while_b_waited <= len(b_grants)
    else:
        # First come, first served: B waits behind A's backlog (on a slow machine some of its requests are even
        # shed after SERVING_ADMISSION_MAX_WAIT_S).
        assert run >= 3


if __name__ == "__main__":
    asyncio.run(_client(*sys.argv[1:]))
