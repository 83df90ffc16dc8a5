"""Replica-side continuous-batching scheduler for generation.

Requests wait in a bounded queue; between steps the scheduler admits as many as there are free rows (a row
frees the step its sequence ends), gives the prompts being prefilled the step's token budget (oldest first:
several short prompts together, a long one in chunks), runs the step in a worker thread and streams each
sequence's chunks back to its caller. A caller that goes away marks its sequence cancelled, and the next step drops its
row. Beyond the waiting cap a request is refused at once (Overloaded → UNAVAILABLE / 503 with retry-after).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serving.errors import InvalidInput, Overloaded
from serving.models.generate import GenerateRunner
from serving.models.prefix_cache import BLOCK_TOKENS
from serving.models.sequence import GenerateItem, GenerateOutput, Sequence, TextChunk
from serving.models.stats import GenerationStats


@dataclass(frozen=True)
class EngineLimits:
    max_running: int  # rows in the running batch
    max_waiting: int  # accepted requests not yet running
    max_prefill_tokens: int  # prompt tokens computed per step (bounds the stall running rows see)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()
_Waiter = tuple[Sequence, asyncio.Queue[object]]


def _computes_for(other: Sequence, seq: Sequence) -> bool:
    """Whether ``other``'s prefill is still to compute whole blocks that ``seq``'s prompt starts with (so that
    ``seq`` would find them in the prefix cache if it waited)."""
    assert other.prompt is not None
    a, b = other.prompt_ids, seq.prompt_ids
    shared = 0
    while shared + BLOCK_TOKENS < len(b) and a[shared : shared + BLOCK_TOKENS] == b[shared : shared + BLOCK_TOKENS]:
        shared += BLOCK_TOKENS
    return other.prompt.filled < shared


class GenerationEngine:
    def __init__(self, runner: GenerateRunner, limits: EngineLimits, stats: GenerationStats):
        self._runner = runner
        self._limits = limits
        self._stats = stats
        self._waiting: deque[_Waiter] = deque()
        self._admitted: dict[Sequence, asyncio.Queue[object]] = {}  # prefilling or running
        self._prefilling: list[Sequence] = []
        self._rows = runner.new_rows()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._admitted)

    async def stream(self, item: GenerateItem) -> AsyncIterator[TextChunk | GenerateOutput]:
        if not item.prompt_ids:  # the gateway never sends one; a step needs at least one prompt token
            raise InvalidInput("the prompt has no tokens", param="prompt")
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

    def _admit(self) -> None:
        """Waiting requests take the rows that are free (prefilling ones count: they are about to run)."""
        while self._waiting and len(self._admitted) < self._limits.max_running:
            seq, events = self._waiting.popleft()
            if seq.cancelled:
                continue
            self._admitted[seq] = events
            self._prefilling.append(seq)

    def _plan(self) -> list[tuple[Sequence, int]]:
        """The prompt tokens this step computes, oldest admission first, within the per-step budget: several
        short prompts together, a long one in chunks over several steps.

        A prompt gets its store and looks up the prefix cache when it is first scheduled, not when admitted, and
        waits while an earlier prompt that shares whole blocks with it has not computed them yet: a burst of
        requests with one system prompt computes it once, and the rest take it from the cache a step or two
        later. Runs on the step thread (stores are allocated and cached blocks copied here, off the event loop)."""
        chunks: list[tuple[Sequence, int]] = []
        under_way: list[Sequence] = []
        sharing = self._runner.prefix_cache.enabled
        budget = self._limits.max_prefill_tokens
        for seq in self._prefilling:
            if seq.cancelled:
                continue
            if seq.prompt is None:
                if budget <= 0 or (sharing and any(_computes_for(other, seq) for other in under_way)):
                    continue
                self._runner.attach_prefix(seq)
            prompt = seq.prompt
            assert prompt is not None
            under_way.append(seq)
            if budget > 0:
                count = min(len(seq.prompt_ids) - prompt.filled, budget)
                chunks.append((seq, count))
                budget -= count
        return chunks

    def _drop_cancelled_prefills(self) -> None:
        """Callers that left before their prompt ran to its end: nothing more to send them."""
        for seq in [seq for seq in self._prefilling if seq.cancelled]:
            self._prefilling.remove(seq)
            self._admitted.pop(seq).put_nowait(_DONE)

    def _step(self) -> list[Sequence] | None:
        """On the step thread: plan and run one step; None when there is nothing to run."""
        chunks = self._plan()
        if not len(self._rows) and not chunks:
            return None
        self._stats.record_step(len(self._rows), sum(count for _, count in chunks), self._limits.max_running)
        return self._runner.step(self._rows, chunks)

    async def _run(self) -> None:
        while True:
            if not self._admitted and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                self._admit()
                self._drop_cancelled_prefills()
                # The loop waits for the thread: admission and the engine's lists do not change meanwhile.
                finished = await asyncio.to_thread(self._step)
            except Exception as exc:  # every admitted caller hears it; the loop and later requests live on
                for events in self._admitted.values():
                    events.put_nowait(_Failed(exc))
                self._admitted.clear()
                self._prefilling.clear()
                self._rows = self._runner.new_rows()
                continue
            if finished is None:  # everything admitted was cancelled
                continue
            self._prefilling = [seq for seq in self._prefilling if not seq.prefilled]
            for seq in finished:
                self._admitted.pop(seq).put_nowait(_DONE)
