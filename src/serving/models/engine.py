"""Replica-side continuous-batching scheduler for generation.

Requests wait in a bounded queue; between decode steps the scheduler moves as many as fit (running-row cap,
prefill-token budget) into the running batch, runs one step in a worker thread and streams each sequence's
chunks back to its caller. A caller that goes away marks its sequence cancelled, and the next step drops its
row. Beyond the waiting cap a request is refused at once (Overloaded → UNAVAILABLE / 503 with retry-after).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.errors import Overloaded
from serving.models.generate import GenerateRunner
from serving.models.kvbatch import RunningBatch
from serving.models.sequence import GenerateItem, GenerateOutput, Sequence, TextChunk
from serving.models.stats import BatchStats


@dataclass(frozen=True)
class EngineLimits:
    max_running: int  # rows in the running batch
    max_waiting: int  # accepted requests not yet running
    max_prefill_tokens: int  # prompt tokens prefilled in one step (bounds the stall running rows see)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()
_Waiter = tuple[Sequence, asyncio.Queue[object]]


class GenerationEngine:
    def __init__(self, runner: GenerateRunner, limits: EngineLimits, stats: BatchStats):
        self._runner = runner
        self._limits = limits
        self._stats = stats
        self._waiting: deque[_Waiter] = deque()
        self._running: dict[Sequence, asyncio.Queue[object]] = {}
        self._batch = RunningBatch()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    async def stream(self, item: GenerateItem) -> AsyncIterator[TextChunk | GenerateOutput]:
        if len(self._waiting) >= self._limits.max_waiting:
            raise Overloaded(
                f"the generation model has {self._limits.max_waiting} requests waiting; retry shortly",
                retry_after_s=1.0,
            )
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        seq = self._runner.preprocess(item)

        def on_chunk(chunk: TextChunk) -> None:  # runs on the decode thread
            loop.call_soon_threadsafe(events.put_nowait, chunk)

        seq.on_chunk = on_chunk
        self._waiting.append((seq, events))
        self._wake.set()
        try:
            while (event := await events.get()) is not _DONE:
                if isinstance(event, _Failed):
                    raise event.error
                assert isinstance(event, TextChunk)
                yield event
            yield seq.output()
        finally:
            seq.cancelled = True  # a no-op when finished; frees the row at the next step when the caller left

    def _take_joining(self) -> list[Sequence]:
        joining: list[Sequence] = []
        budget = self._limits.max_prefill_tokens
        while self._waiting and len(self._running) < self._limits.max_running:
            seq, events = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            if joining and len(seq.prompt_ids) > budget:  # the first one always fits, however long
                break
            self._waiting.popleft()
            budget -= len(seq.prompt_ids)
            joining.append(seq)
            self._running[seq] = events
        return joining

    async def _run(self) -> None:
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            joining = self._take_joining()
            if not self._running:  # everything that waited was cancelled
                continue
            self._stats.record(len(self._running))
            try:
                finished = await asyncio.to_thread(self._runner.step, self._batch, joining)
            except Exception as exc:  # every running caller hears it; the loop and later requests live on
                for events in self._running.values():
                    events.put_nowait(_Failed(exc))
                self._running.clear()
                self._batch = RunningBatch()
                continue
            for seq in finished:
                self._running.pop(seq).put_nowait(_DONE)
            for seq in joining:  # cancelled before its prefill: never ran, nothing more to send
                if seq.cancelled and seq in self._running and seq not in self._batch.seqs:
                    self._running.pop(seq).put_nowait(_DONE)
