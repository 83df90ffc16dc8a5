"""A model without a running replica fails fast: calls are refused with UNAVAILABLE, and calls already waiting in
Serve's queue are cancelled, instead of waiting for a replica that may be minutes away (in-process, a fake handle
that behaves like Serve's DeploymentResponse; the real path is tests/test_multinode.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, cast

import pytest

from serving.errors import Unavailable
from serving.gateway.router import ModelRoute
from serving.models.registry import ModelSpec


class PendingResponse:
    """Like a DeploymentResponse that no replica has picked up: cancel() makes its awaiter raise CancelledError."""

    def __init__(self) -> None:
        self.future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._cancelled = False

    def __await__(self) -> Generator[Any, None, list[int]]:
        return self.future.__await__()

    def cancel(self) -> None:
        self._cancelled = True
        self.future.cancel()

    def cancelled(self) -> bool:
        return self._cancelled


class FakeHandle:
    def __init__(self) -> None:
        self.responses: list[PendingResponse] = []
        self.infer = self

    def remote(self, items: list[int]) -> PendingResponse:
        self.responses.append(PendingResponse())
        return self.responses[-1]


def _route(handle: FakeHandle) -> ModelRoute:
    spec = cast(ModelSpec, type("Spec", (), {"id": "minilm-l6"})())
    return ModelRoute(spec=spec, codec=cast(Any, None), handle=cast(Any, handle), dimensions=384)


async def test_waiting_calls_are_cancelled_and_new_ones_refused_until_a_replica_runs() -> None:
    handle = FakeHandle()
    route = _route(handle)
    waiting = asyncio.create_task(route._call_batch([1, 2]))
    await asyncio.sleep(0)  # the call reaches the handle and waits for a replica
    assert len(handle.responses) == 1

    route.lose_replicas()
    with pytest.raises(Unavailable) as cancelled:
        await waiting
    assert cancelled.value.retry_after_s == 1.0 and handle.responses[0].cancelled()
    with pytest.raises(Unavailable, match="no running replica"):
        await route._call_batch([3])
    assert len(handle.responses) == 1  # refused before reaching Serve

    route.no_replicas.clear()  # a replica runs again
    answered = asyncio.create_task(route._call_batch([4]))
    await asyncio.sleep(0)
    handle.responses[-1].future.set_result([40])
    assert await answered == [40]


async def test_a_caller_cancelling_its_own_call_is_not_turned_into_unavailable() -> None:
    handle = FakeHandle()
    route = _route(handle)
    call = asyncio.create_task(route._call_batch([1]))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not route._in_flight
