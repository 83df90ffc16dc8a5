"""Groups concurrent requests for one model into one call across the Ray boundary.

Adaptive: while fewer than ``max_inflight`` batches are out, a batch leaves at the end of the current
event-loop turn (requests that arrived together travel together, an idle model waits for nothing). When
the pipeline is full, requests accumulate until a batch comes back, the batch reaches ``max_batch_size``
items, or its oldest item has waited ``max_wait_s`` (a timer armed by the first item; never a fixed
sleep). A request never straddles two batches, and one larger than the cap goes alone.

Each submission may carry a ``link`` (an opaque tag, e.g. a tracing span context); with ``send_linked`` the
batch is sent with the links of the requests it carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    items: list[In]
    future: asyncio.Future[list[Out]]
    link: Any = None


@dataclass
class _Batch(Generic[In, Out]):
    pending: list[_Pending[In, Out]] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None
    scheduled: bool = False


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self,
        send: Callable[[list[In]], Awaitable[list[Out]]],
        max_batch_size: int,
        max_wait_s: float,
        max_inflight: int = 2,
        *,
        send_linked: Callable[[list[In], list[Any]], Awaitable[list[Out]]] | None = None,
    ) -> None:
        self._send = send
        self._send_linked = send_linked
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_inflight = max_inflight
        self._open: _Batch[In, Out] = _Batch()
        self._inflight: set[asyncio.Task[None]] = set()

    async def submit(self, items: list[In], link: Any = None) -> list[Out]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Out]] = loop.create_future()
        if self._open.size + len(items) > self._max_batch_size and self._open.pending:
            self._flush()
        batch = self._open
        batch.pending.append(_Pending(items, future, link))
        batch.size += len(items)
        if batch.size >= self._max_batch_size:
            self._flush()
        elif len(self._inflight) < self._max_inflight:
            if not batch.scheduled:  # leave at the end of this loop turn, with whatever joined meanwhile
                batch.scheduled = True
                loop.call_soon(self._flush_if_open, batch)
        elif batch.timer is None:
            batch.timer = loop.call_later(self._max_wait_s, self._flush_if_open, batch)
        return await future

    def _flush_if_open(self, batch: _Batch[In, Out]) -> None:
        if batch is self._open and batch.pending:
            self._flush()

    def _flush(self) -> None:
        batch, self._open = self._open, _Batch()
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._open.pending and len(self._inflight) < self._max_inflight:
            self._flush()  # the pipeline has room: what accumulated leaves now

    async def _run(self, batch: _Batch[In, Out]) -> None:
        live = [p for p in batch.pending if not p.future.done()]  # callers that gave up are dropped
        if not live:
            return
        try:
            flat = [item for p in live for item in p.items]
            if self._send_linked is not None:
                outputs = await self._send_linked(flat, [p.link for p in live if p.link is not None])
            else:
                outputs = await self._send(flat)
        except BaseException as exc:  # every caller in the batch hears the failure
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        start = 0
        for p in live:
            if not p.future.done():
                p.future.set_result(outputs[start : start + len(p.items)])
            start += len(p.items)
