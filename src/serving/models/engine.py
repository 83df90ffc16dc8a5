"""Replica-side generation scheduler: gathers waiting requests into a batch (on size or deadline), runs the
decode loop in a worker thread and streams each sequence's deltas back to its caller.

A caller that goes away marks its sequence cancelled; the decode loop stops producing for it at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.models.generate import GenerateItem, GenerateOutput, GenerateRunner, Sequence
from serving.models.stats import BatchStats


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()


class GenerationEngine:
    def __init__(self, runner: GenerateRunner, max_batch_size: int, max_wait_s: float, stats: BatchStats):
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._stats = stats
        self._waiting: asyncio.Queue[tuple[Sequence, asyncio.Queue[object]]] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None

    async def stream(self, item: GenerateItem) -> AsyncIterator[str | GenerateOutput]:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        seq = self._runner.preprocess(item)

        def on_delta(text: str) -> None:  # runs on the decode thread
            loop.call_soon_threadsafe(events.put_nowait, text)

        seq.on_delta = on_delta
        await self._waiting.put((seq, events))
        try:
            while (event := await events.get()) is not _DONE:
                if isinstance(event, _Failed):
                    raise event.error
                assert isinstance(event, str)
                yield event
            yield self._runner.postprocess(seq)
        finally:
            seq.cancelled = True  # a no-op when finished; frees the row when the caller went away

    async def _gather(self) -> list[tuple[Sequence, asyncio.Queue[object]]]:
        batch = [await self._waiting.get()]
        deadline = asyncio.get_running_loop().time() + self._max_wait_s
        while len(batch) < self._max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:  # past the deadline: take only what is already waiting
                if self._waiting.empty():
                    break
                batch.append(self._waiting.get_nowait())
                continue
            try:
                batch.append(await asyncio.wait_for(self._waiting.get(), remaining))
            except TimeoutError:
                break
        return [(seq, events) for seq, events in batch if not seq.cancelled]

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self._stats.record(len(batch))
            try:
                await asyncio.to_thread(self._runner.predict, [seq for seq, _ in batch])
            except Exception as exc:  # the whole batch failed; every caller hears it, the loop lives on
                for _, events in batch:
                    events.put_nowait(_Failed(exc))
                continue
            for _, events in batch:
                events.put_nowait(_DONE)
