"""The fair queue on its own: which partner each freed slot goes to (events and counts, no clocks)."""

from __future__ import annotations

import asyncio
import random

import pytest

from serving.errors import Overloaded
from serving.quota.fairqueue import FairQueue, Grant


async def _arrive(queue: FairQueue, partner: str, n: int = 1, weight: float = 1.0) -> list[asyncio.Task[None]]:
    """``n`` requests of ``partner`` join the queue, in this order."""
    before = queue.waiting
    tasks = [asyncio.create_task(queue.acquire(partner, weight)) for _ in range(n)]
    await asyncio.sleep(0)  # one loop turn (no clock): each new task runs up to its wait in the queue
    assert queue.waiting == before + n
    return tasks


def _serve(queue: FairQueue, slots: int) -> str:
    """Frees the slot ``slots`` times (each grantee finishes before the next release); who got it, in order."""
    before = len(queue.recent_grants())
    for _ in range(slots):
        queue.release()
    return "".join(grant.partner for grant in queue.recent_grants()[before:])


async def _saturated(fair: bool = True, **kwargs: float) -> FairQueue:
    """A one-slot queue whose slot is taken by partner H, so that every later request waits."""
    queue = FairQueue("m", 1, int(kwargs.pop("max_queue", 64)), kwargs.pop("max_wait_s", 60.0), fair=fair)
    await queue.acquire("H", 1.0)
    return queue


async def _drain(queue: FairQueue, tasks: list[asyncio.Task[None]]) -> None:
    while queue.waiting:
        queue.release()
    await asyncio.gather(*tasks, return_exceptions=True)


def max_run_while_other_waits(grants: list[Grant], partner: str) -> int:
    """The most grants in a row that went to others while ``partner`` had a request waiting (two partners)."""
    longest = run = 0
    for grant in grants:
        run = run + 1 if grant.partner != partner and grant.others_waiting > 0 else 0
        longest = max(longest, run)
    return longest


async def test_equal_weights_alternate_while_both_wait() -> None:
    queue = await _saturated()
    tasks = await _arrive(queue, "A", 6) + await _arrive(queue, "B", 3)
    assert _serve(queue, 9) == "ABABABAAA"
    grants = queue.recent_grants()[1:]
    assert [g.others_waiting for g in grants] == [3, 5, 2, 4, 1, 3, 0, 0, 0]  # B waited at each of the first A grants
    assert max_run_while_other_waits(grants, "B") == 1
    await _drain(queue, tasks)


async def test_fifo_serves_in_arrival_order() -> None:
    queue = await _saturated(fair=False)
    tasks = await _arrive(queue, "A", 6) + await _arrive(queue, "B", 3)
    assert _serve(queue, 9) == "AAAAAABBB"
    assert max_run_while_other_waits(queue.recent_grants()[1:], "B") == 6
    await _drain(queue, tasks)


async def test_weights_share_slots_in_their_ratio() -> None:
    queue = await _saturated()
    tasks = await _arrive(queue, "A", 12, weight=2.0) + await _arrive(queue, "B", 12, weight=1.0)
    order = _serve(queue, 18)
    assert (order.count("A"), order.count("B")) == (12, 6)
    for end in range(3, 19, 3):  # in every prefix of three grants: two for A, one for B (±1)
        assert abs(order[:end].count("A") - 2 * order[:end].count("B")) <= 2
    await _drain(queue, tasks)


async def test_a_partner_below_its_share_goes_ahead_of_a_backlog() -> None:
    queue = await _saturated()
    tasks = await _arrive(queue, "A", 8)
    assert _serve(queue, 2) == "AA"
    tasks += await _arrive(queue, "C")
    assert _serve(queue, 2) == "CA"  # the newcomer goes next, ahead of A's six waiting requests
    await _drain(queue, tasks)


async def test_equal_tags_go_to_the_partner_served_longer_ago() -> None:
    queue = await _saturated()
    tasks = await _arrive(queue, "B") + await _arrive(queue, "A", 4)
    assert _serve(queue, 2) == "BA"
    tasks += await _arrive(queue, "B")  # B is back (its tag equals A's next one): it was served longer ago than A
    assert _serve(queue, 2) == "BA"
    await _drain(queue, tasks)


async def test_giving_up_leaves_no_debt() -> None:
    queue = await _saturated()
    tasks = await _arrive(queue, "A", 6)
    gave_up = await _arrive(queue, "B", 4)
    for task in gave_up:
        task.cancel()
    await asyncio.gather(*gave_up, return_exceptions=True)
    assert queue.waiting_by_partner() == {"A": 6}
    tasks += await _arrive(queue, "B")
    # B's cancelled requests were never served, so they do not push its next one back behind A's backlog.
    assert _serve(queue, 3) == "ABA"
    await _drain(queue, tasks)


async def test_a_full_partner_queue_sheds_only_that_partner() -> None:
    queue = await _saturated(max_queue=2)
    tasks = await _arrive(queue, "A", 2)
    with pytest.raises(Overloaded):
        await queue.acquire("A", 1.0)
    tasks += await _arrive(queue, "B", 2)
    assert _serve(queue, 4) == "ABAB"
    await _drain(queue, tasks)


async def test_waiting_past_max_wait_sheds_with_overloaded() -> None:
    queue = await _saturated(max_wait_s=0.0)
    with pytest.raises(Overloaded) as shed:
        await queue.acquire("A", 1.0)
    assert isinstance(shed.value.__cause__, TimeoutError)
    assert queue.waiting == 0 and queue.in_use == 1
    queue.release()
    assert queue.in_use == 0


async def test_a_grant_its_caller_no_longer_wants_passes_on() -> None:
    queue = await _saturated()
    a, b = await _arrive(queue, "A") + await _arrive(queue, "B")
    queue.release()  # A gets the slot ...
    a.cancel()  # ... but its caller goes away before it resumes
    await asyncio.gather(a, return_exceptions=True)
    assert queue.in_use == 1 and [g.partner for g in queue.recent_grants()] == ["H", "A", "B"]
    await b
    queue.release()
    assert queue.in_use == 0 and queue.waiting == 0


async def test_the_grant_record_is_bounded() -> None:
    queue = FairQueue("m", 1, 64, 60.0, history=4)
    for _ in range(10):
        await queue.acquire("A", 1.0)
        queue.release()
    assert len(queue.recent_grants()) == 4


@pytest.mark.parametrize("seed", range(5))
async def test_no_partner_is_served_twice_while_an_equal_one_waits(seed: int) -> None:
    """Random arrivals, cancellations and releases, two partners of equal weight: whenever B had a request
    waiting, A never got two grants in a row (and the other way round)."""
    rng = random.Random(seed)
    queue = await _saturated()
    tasks: list[asyncio.Task[None]] = []
    for _ in range(400):
        step = rng.random()
        waiting = queue.waiting_by_partner()
        if step < 0.35 and waiting.get("A", 0) < 60:
            tasks += await _arrive(queue, "A", rng.randint(1, 4))
        elif 0.35 <= step < 0.55 and waiting.get("B", 0) < 60:
            tasks += await _arrive(queue, "B", rng.randint(1, 2))
        elif step < 0.6 and (pending := [t for t in tasks if not t.done()]):
            victim = rng.choice(pending)
            victim.cancel()  # a victim granted but not resumed yet hands its slot on
            await asyncio.gather(victim, return_exceptions=True)
        elif queue.waiting:
            queue.release()
    grants = [g for g in queue.recent_grants() if g.partner != "H"]
    assert len(grants) > 100
    assert max_run_while_other_waits(grants, "B") <= 1
    assert max_run_while_other_waits(grants, "A") <= 1
    await _drain(queue, tasks)
