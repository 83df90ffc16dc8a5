"""The streaming side of the core: the stream object front doors iterate and close, the pacing metrics of a
stream, and how a finished stream is replayed for an idempotency key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

from serving.domain import GenerateResult, StreamEvent, TextDelta
from serving.observability.metrics import Metrics


class StreamPace:
    """Time to first token and the gaps between streamed chunks, as the caller sees them."""

    def __init__(self, metrics: Metrics, model: str, started: float) -> None:
        self._first = metrics.time_to_first_token.labels(model)
        self._gap = metrics.inter_token.labels(model)
        self._last: float | None = None
        self._started = started

    def chunk(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._first.observe(now - self._started)
        else:
            self._gap.observe(now - self._last)
        self._last = now


class EventStream:
    """An admitted generation stream: iterate it for ``TextDelta`` events and one final ``GenerateResult``, and
    always ``aclose()`` it. Closing one that was never iterated still finishes (meters) its call."""

    def __init__(self, events: AsyncIterator[StreamEvent], abandoned: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._abandoned = abandoned
        self._started = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamEvent:
        self._started = True
        return await anext(self._events)

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            await self._abandoned()
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


async def replay_events(final: GenerateResult) -> AsyncIterator[StreamEvent]:
    """A finished stream, replayed: its whole text as one delta, then its final event."""
    if final.text:
        yield TextDelta(final.text, final.usage.output_tokens)
    yield final


async def nothing_to_settle() -> None:
    """A replayed stream has nothing to settle when it is closed unread."""
