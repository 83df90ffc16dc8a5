"""One Redis round trip per event-loop turn for every script the gateway runs (quota and idempotency keys).

Each store registers its scripts as named Lua functions. A call queues ``(function, keys, args)``; the calls queued
during one turn of the event loop (and those that arrive while a batch is in flight) go to Redis together as one
EVALSHA of a script that runs them one after another in arrival order. Redis runs a script atomically, so the batch
is applied as a whole, in order, with no other client's command in between: limits stay exact across gateway
replicas exactly as with one script call per operation. Only one batch is in flight per gateway, which keeps the
order across batches too, and under load turns N round trips into one. Settlements are lazy: nobody waits on them,
so they open no round trip of their own but ride with the next reservation (at most ``LAZY_S`` later). A lazy
operation is still queued in arrival order, so a partner's settlement always reaches Redis before its own next
reservation: a client at its concurrency limit that sends its next request as soon as one ends is not refused.

Every key an operation touches is passed in KEYS. In a Redis Cluster a batch spanning partners would cross hash
slots; this module targets one Redis primary (or a proxy that keeps a script on one node), as the gateway does.

Failures: a connection broken by a Redis restart is replaced and the batch sent once more (each function is written
to be idempotent when run twice: see the stores); NOSCRIPT (a restarted Redis lost the script) loads it again. A
batch that fails otherwise fails every call in it with the same exception; a function that raises fails only its
own call (``pcall``), with a ``ResponseError``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from serving.storage.resp import RespConnection

log = logging.getLogger("serving.redis")

MAX_BATCH = 512  # operations per script call; more wait for the next one (bounds one call's time in Redis)
LAZY_S = 0.005  # the longest a lazy operation (a settlement) waits for a batch to ride with

_DISPATCH = """
local results, ki, ai = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local name, nk, na = ARGV[ai], tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
  ai = ai + 3
  local k, a = {}, {}
  for j = 1, nk do k[j] = KEYS[ki]; ki = ki + 1 end
  for j = 1, na do a[j] = ARGV[ai]; ai = ai + 1 end
  local ok, res = pcall(F[name], k, a)
  if ok then
    results[i] = {1, res or false}
  else
    if type(res) == 'table' then res = res.err or 'error' end
    results[i] = {0, tostring(res)}
  end
end
return results
"""


@dataclass
class _Op:
    name: str
    keys: Sequence[str]
    args: Sequence[Any]
    future: asyncio.Future[Any]
    lazy: bool


def _script(functions: dict[str, str]) -> str:
    # Each body is written like a standalone script (KEYS, ARGV): as a function those names are its parameters.
    defs = "".join(f"F[{name!r}] = function(KEYS, ARGV)\n{body}\nend\n" for name, body in sorted(functions.items()))
    return "local F = {}\n" + defs + _DISPATCH


class RedisBatch:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self._redis = RespConnection(url, timeout_s)
        self._functions: dict[str, str] = {}
        self._source = ""
        self._sha = ""
        self._queue: list[_Op] = []
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.batches = 0  # script calls made, and operations they carried (what the benchmark reports)
        self.operations = 0

    def register(self, name: str, body: str) -> None:
        """Adds a Lua function (a script body using KEYS and ARGV); the next batch carries it."""
        if self._functions.get(name) not in (None, body):
            raise ValueError(f"a different Redis function named {name!r} is already registered")
        self._functions[name] = body
        self._source = _script(self._functions)
        self._sha = hashlib.sha1(self._source.encode()).hexdigest()

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any], *, lazy: bool = False) -> asyncio.Future[Any]:
        """Queues one operation; the future gets its result (or the batch's exception). A ``lazy`` operation (one
        nobody waits on, such as a settlement) opens no round trip of its own: it rides with the next batch, or
        leaves after ``LAZY_S`` when nothing else comes."""
        if name not in self._functions:
            raise KeyError(f"no Redis function {name!r} registered")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Op(name, keys, args, future, lazy))
        if self._sender is not None and not self._sender.done():
            return future  # the sender takes it with its next batch
        if not lazy:
            self._start()  # on the next turn: every call made during this turn joins the batch
        elif self._timer is None:
            self._timer = loop.call_later(LAZY_S, self._start, True)
        return future

    def _start(self, flush_lazy: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue and (self._sender is None or self._sender.done()):
            self._sender = asyncio.get_running_loop().create_task(self._send_all(flush_lazy))

    async def _send_all(self, flush_lazy: bool) -> None:
        while self._queue:
            if not (flush_lazy or self._closing) and all(op.lazy for op in self._queue):
                if self._timer is None:  # only lazy ones left: they wait for company, or for the timer
                    self._timer = asyncio.get_running_loop().call_later(LAZY_S, self._start, True)
                return
            flush_lazy = False
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            # A caller that gave up before its operation left (cancelled) is dropped: nothing was applied.
            batch = [op for op in batch if not op.future.done()]
            if not batch:
                continue
            try:
                replies = await self._send(batch)
            except BaseException as exc:  # every call of the batch learns why; a cancel ends the sender too
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(exc if isinstance(exc, Exception) else RedisConnectionError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for op, (ok, value) in zip(batch, replies, strict=True):
                if op.future.done():
                    continue
                if int(ok):
                    op.future.set_result(value)
                else:
                    op.future.set_exception(ResponseError(value.decode() if isinstance(value, bytes) else str(value)))

    async def _send(self, batch: list[_Op]) -> list[Any]:
        keys: list[str] = []
        args: list[Any] = [len(batch)]
        for op in batch:
            keys.extend(op.keys)
            args.extend((op.name, len(op.keys), len(op.args)))
            args.extend(op.args)
        self.batches += 1
        self.operations += len(batch)
        command = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            replies = await self._evalsha(command)
        except RedisConnectionError:  # a Redis restart broke the connection: once more, on a new one
            replies = await self._evalsha(command)
        return list(replies)

    async def _evalsha(self, command: tuple[Any, ...]) -> Any:
        try:
            return await self._redis.call(*command)
        except NoScriptError:  # a restarted (or flushed) Redis lost the script: load it and send the batch again
            await self._redis.call("SCRIPT", "LOAD", self._source)
            return await self._redis.call(*command)

    async def close(self) -> None:
        """Sends what is queued (lazy operations too), then closes the connection."""
        self._closing = True
        self._start(flush_lazy=True)
        while self._sender is not None and not self._sender.done():
            await asyncio.gather(self._sender, return_exceptions=True)
        self._redis.close()
