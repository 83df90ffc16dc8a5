"""Fair admission to one model: at most ``capacity`` requests in flight; when the model is saturated,
requests wait in per-partner lanes served by start-time fair queuing over the plan weight.

Each partner with requests waiting has a lane (first come, first served within it). Only the request at the head
of a lane has a tag: its start tag is the later of the virtual time and the finish tag of the partner's last
granted request, and its finish tag is start + 1/weight. The lane with the smallest start tag is served next and
the virtual time moves to that tag, so a partner using less than its share goes ahead of one that keeps a backlog.
Equal start tags go to the lane served longer ago: two partners of equal weight that both have requests waiting
are served alternately, never one twice in a row while the other waits. A request that gives up while waiting
(deadline, cancellation, queue timeout) leaves no debt behind: it never had a tag of its own, so the partner's
next request is not pushed back.

With ``fair=False`` all requests wait in one lane, first come, first served (to show what fairness buys).

Each partner's queue is bounded in length and wait time; past either bound the request is shed with Overloaded
(UNAVAILABLE/503 + retry-after). The last ``history`` admissions are kept for inspection (``recent_grants``):
who got the slot, how long it waited, how many requests of other partners were still waiting. Nothing here grows
without bound: at most one lane per partner, cleared whenever the model goes idle.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from serving.errors import Overloaded

GRANT_HISTORY = 1024


@dataclass(frozen=True)
class Grant:
    """One admission to the model, in the order they happened."""

    partner: str
    waited_s: float  # 0 when a slot was free and nobody waited
    others_waiting: int  # requests of other partners still waiting once this one got its slot


@dataclass(eq=False)
class _Waiter:
    partner: str
    weight: float
    future: asyncio.Future[None]
    since: float  # perf_counter at arrival
    queued: bool = True  # still in its lane (False once granted or dropped)


@dataclass(eq=False)
class _Lane:
    waiters: deque[_Waiter] = field(default_factory=deque)
    finish: float = 0.0  # finish tag of the lane's last granted request
    last_grant: int = -1  # number of its last grant; -1: none since the model was last idle
    entry: int = -1  # id of its live heap entry; -1 while it has none


class FairQueue:
    def __init__(
        self,
        model: str,
        capacity: int,
        max_queue_per_partner: int,
        max_wait_s: float,
        *,
        fair: bool = True,
        history: int = GRANT_HISTORY,
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.max_queue_per_partner = max_queue_per_partner
        self.max_wait_s = max_wait_s
        self.fair = fair
        self.in_use = 0
        self._virtual = 0.0
        self._lanes: dict[str, _Lane] = {}
        # (start tag, lane's last grant, entry id, lane key): one live entry per lane with requests waiting
        self._heap: list[tuple[float, int, int, str]] = []
        self._stale = 0  # entries of lanes that emptied by giving up; dropped when popped or on a rebuild
        self._queued: Counter[str] = Counter()
        self._waiting = 0
        self._entries = itertools.count()
        self._grant_numbers = itertools.count()
        self._grants: deque[Grant] = deque(maxlen=history)

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_by_partner(self) -> dict[str, int]:
        return dict(self._queued)

    def recent_grants(self) -> list[Grant]:
        """The last ``history`` admissions, oldest first."""
        return list(self._grants)

    async def acquire(self, partner: str, weight: float) -> None:
        """Returns once the caller holds a slot; the caller must ``release()`` it."""
        if self.in_use < self.capacity and not self._waiting:
            self.in_use += 1
            self._grants.append(Grant(partner, 0.0, 0))
            return
        if self._queued[partner] >= self.max_queue_per_partner:
            raise Overloaded(
                f"model {self.model} is saturated and your queue is full ({self.max_queue_per_partner}); retry later",
                retry_after_s=1.0,
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(partner, weight, future, time.perf_counter())
        self._join(waiter)
        try:
            async with asyncio.timeout(self.max_wait_s):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self.release()  # granted in the same instant it gave up: hand the slot on
            else:
                future.cancel()
                self._give_up(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"model {self.model} stayed saturated for {self.max_wait_s:.0f} s; retry later", retry_after_s=1.0
                ) from exc
            raise

    def release(self) -> None:
        self.in_use -= 1
        while self.in_use < self.capacity and (waiter := self._next_waiter()) is not None:
            self.in_use += 1
            waiter.future.set_result(None)
            others = self._waiting - self._queued[waiter.partner]
            self._grants.append(Grant(waiter.partner, time.perf_counter() - waiter.since, others))
        if not self._waiting and not self.in_use:  # idle: start everyone afresh
            self._lanes.clear()
            self._heap.clear()
            self._stale = 0
            self._virtual = 0.0

    # --- lanes ----------------------------------------------------------------------------------------

    def _lane_key(self, partner: str) -> str:
        return partner if self.fair else ""

    def _join(self, waiter: _Waiter) -> None:
        key = self._lane_key(waiter.partner)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.waiters.append(waiter)
        self._queued[waiter.partner] += 1
        self._waiting += 1
        if lane.entry < 0:
            self._schedule(key, lane)

    def _schedule(self, key: str, lane: _Lane) -> None:
        """Tags the lane's head and puts the lane in line."""
        lane.entry = next(self._entries)
        heapq.heappush(self._heap, (max(self._virtual, lane.finish), lane.last_grant, lane.entry, key))

    def _next_waiter(self) -> _Waiter | None:
        """Takes the head of the lane with the smallest start tag (ties: the lane served longer ago)."""
        while self._heap:
            start, _, entry, key = heapq.heappop(self._heap)
            lane = self._lanes.get(key)
            if lane is None or lane.entry != entry:
                self._stale -= 1
                continue
            lane.entry = -1
            while lane.waiters:
                waiter = lane.waiters.popleft()
                self._dequeue(waiter)
                if waiter.future.done():  # cancelled, its task not resumed yet: the next one takes the tag
                    continue
                self._virtual = start
                lane.finish = start + 1.0 / waiter.weight
                lane.last_grant = next(self._grant_numbers)
                if lane.waiters:
                    self._schedule(key, lane)
                return waiter
        return None

    def _give_up(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        lane = self._lanes[self._lane_key(waiter.partner)]
        lane.waiters.remove(waiter)
        self._dequeue(waiter)
        if not lane.waiters and lane.entry >= 0:
            lane.entry = -1  # its heap entry is stale now
            self._stale += 1
            if self._stale > 32 and self._stale * 2 > len(self._heap):
                self._heap = [e for e in self._heap if (lane_ := self._lanes.get(e[3])) and lane_.entry == e[2]]
                heapq.heapify(self._heap)
                self._stale = 0

    def _dequeue(self, waiter: _Waiter) -> None:
        waiter.queued = False
        self._waiting -= 1
        self._queued[waiter.partner] -= 1
        if self._queued[waiter.partner] <= 0:
            del self._queued[waiter.partner]
