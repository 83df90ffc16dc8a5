"""Fair admission to one model: at most ``capacity`` requests in flight; when the model is saturated,
requests wait in per-partner queues served by weighted fair queuing.

Start-time fair queuing over the plan weight: a request's start tag is the later of the virtual time and
its partner's previous finish tag; finish = start + 1/weight; the smallest start tag is served next. A
partner using less than its share therefore goes ahead of one that keeps a backlog. Each partner's
queue is bounded in length and wait time; past either bound the request is shed with Overloaded
(UNAVAILABLE/503 + retry-after). Nothing here grows without bound.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field

from serving.errors import Overloaded


@dataclass(order=True)
class _Waiter:
    start: float  # served in order of start tags (start-time fair queuing)
    seq: int
    finish: float = field(compare=False)
    partner: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairQueue:
    def __init__(self, model: str, capacity: int, max_queue_per_partner: int, max_wait_s: float) -> None:
        self.model = model
        self.capacity = capacity
        self.max_queue_per_partner = max_queue_per_partner
        self.max_wait_s = max_wait_s
        self.in_use = 0
        self._virtual = 0.0
        self._last_finish: dict[str, float] = {}
        self._heap: list[_Waiter] = []
        self._queued: Counter[str] = Counter()
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(self._queued.values())

    async def acquire(self, partner: str, weight: float) -> None:
        """Returns once the caller holds a slot; the caller must ``release()`` it."""
        if self.in_use < self.capacity and not self._heap:
            self.in_use += 1
            return
        if self._queued[partner] >= self.max_queue_per_partner:
            raise Overloaded(
                f"model {self.model} is saturated and your queue is full ({self.max_queue_per_partner}); retry later",
                retry_after_s=1.0,
            )
        start = max(self._virtual, self._last_finish.get(partner, 0.0))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(start, next(self._seq), start + 1.0 / weight, partner, future)
        self._last_finish[partner] = waiter.finish
        heapq.heappush(self._heap, waiter)
        self._queued[partner] += 1
        try:
            async with asyncio.timeout(self.max_wait_s):
                await waiter.future
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted in the same instant it gave up: hand the slot on
            else:
                waiter.future.cancel()
                self._forget(waiter)
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"model {self.model} stayed saturated for {self.max_wait_s:.0f} s; retry later", retry_after_s=1.0
                ) from exc
            raise

    def _forget(self, waiter: _Waiter) -> None:
        self._queued[waiter.partner] -= 1
        if self._queued[waiter.partner] <= 0:
            del self._queued[waiter.partner]

    def release(self) -> None:
        self.in_use -= 1
        while self._heap and self.in_use < self.capacity:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():  # gave up while queued; already forgotten
                continue
            self._forget(waiter)
            self._virtual = waiter.start  # virtual time: the start tag of the request entering service
            self.in_use += 1
            waiter.future.set_result(None)
        if not self._heap and not self.in_use:
            self._last_finish.clear()  # idle: start everyone afresh
            self._virtual = 0.0
