"""Redis operations that must land eventually (quota settlements, prepaid wallet settlements and releases) but found
Redis unreachable: one bounded queue per store, retried by a single task, oldest first, backing off while Redis stays
away. Each operation is retried until its deadline (its lease's end: past it, applying it changes nothing); beyond
``max_pending`` a new one is dropped and left to its lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

log = logging.getLogger("serving.redis")

FIRST_DELAY_S = 0.25  # the first retry's delay, doubling up to the cap
MAX_DELAY_S = 5.0
MAX_PENDING = 10_000
_UNREACHABLE = (RedisError, TimeoutError)


@dataclass(frozen=True)
class _Pending:
    operation: Callable[[], Awaitable[object]]
    give_up_at: float  # monotonic


class RetryQueue:
    def __init__(self, what: str, max_pending: int = MAX_PENDING) -> None:
        self._what = what  # "quota settlements", in log lines
        self._max_pending = max_pending
        self._pending: deque[_Pending] = deque()
        self._retrier: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, operation: Callable[[], Awaitable[object]], give_up_after_s: float, name: str) -> None:
        """Retries ``operation()`` until it lands or ``give_up_after_s`` has passed (``name``: for the log)."""
        if len(self._pending) >= self._max_pending:
            log.warning("%s for %s dropped (queue full); its lease expires", self._what, name)
            return
        self._pending.append(_Pending(operation, time.monotonic() + give_up_after_s))
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay = FIRST_DELAY_S
        while self._pending:
            await asyncio.sleep(delay)
            while self._pending:
                pending = self._pending[0]
                if time.monotonic() < pending.give_up_at:
                    try:
                        await pending.operation()
                    except _UNREACHABLE:
                        delay = min(delay * 2, MAX_DELAY_S)
                        break
                    delay = FIRST_DELAY_S
                self._pending.popleft()  # landed, or its lease has expired and freed what it held already

    async def drained(self) -> None:
        """Returns once every operation has landed or outlived its deadline (the retries have ended)."""
        while self._retrier is not None and not self._retrier.done():
            await asyncio.shield(self._retrier)

    async def close(self, wait_s: float = 0.0) -> None:
        """Gives the retries ``wait_s`` to finish, then stops them; what is left expires with its lease."""
        retrier = self._retrier
        if retrier is not None and not retrier.done():
            done, _ = await asyncio.wait({retrier}, timeout=wait_s) if wait_s > 0 else (set(), None)
            if not done:
                retrier.cancel()
                await asyncio.gather(retrier, return_exceptions=True)
        if self._pending:
            log.warning("%d %s not delivered; their leases expire", len(self._pending), self._what)
