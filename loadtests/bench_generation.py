"""Continuous batching vs static batching with HF ``generate``, and the prefix cache on vs off, side by side in
one process, one run.

Mixed workload: 32 closed-loop streams (each sends its next request when the last one ends) with mixed prompt
and output lengths drive (a) our continuous-batching engine, with and without its prefix cache, and (b) a
static batcher that takes whatever is waiting (up to 32), runs ``model.generate`` until the longest request in
the batch is done, then answers them all. All use the same model, threads, greedy decoding and max_tokens per
request. Prints useful output tokens per second and their ratios, time to first token p50 under load ÷ alone,
and the mean running-batch fill (running rows per step ÷ the row cap).

Shared-system-prompt workload (customer-service Q&A): a ~200-token system prompt and short user turns, the same
32 streams, engine with the prefix cache ÷ without: TTFT p50 and tokens/s.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench_generation.py [--streams 32] [--requests 192] [--hf-continuous]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.domain import SamplingParams
from serving.models.engine import EngineLimits, GenerationEngine
from serving.models.generate import GenerateRunner
from serving.models.prefix_cache import PrefixCache
from serving.models.ragged import ATTENTION
from serving.models.registry import load_registry
from serving.models.sequence import GenerateItem, GenerateOutput
from serving.models.sources import resolve_model_dir
from serving.models.stats import GenerationStats

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
OUTPUT_LENGTHS = (16, 32, 64, 128)
TOPICS = ("the sea", "a violin", "winter", "bread", "a lighthouse", "trains", "bees", "a library", "rivers")


@dataclass(frozen=True)
class Result:
    tokens: int
    ttft_s: float


@dataclass(frozen=True)
class Run:
    label: str
    tokens: int
    seconds: float
    ttfts: list[float]
    steady_tokens: int  # delivered before the work queue ran dry, while every stream was busy
    steady_seconds: float
    fill: float = 0.0  # continuous batching: mean running rows per step ÷ the row cap, whole run
    steady_fill: float = 0.0  # the same until the work queue ran dry

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def steady_tokens_per_s(self) -> float:
        return self.steady_tokens / self.steady_seconds


@dataclass
class Tally:
    """Output tokens delivered to the callers so far (as they stream, or when a request completes)."""

    tokens: int = 0


SYSTEM_PROMPT = (
    "You are the customer-service assistant of Northwind Parcel, a delivery company operating in twelve "
    "countries. Answer the customer's question in one or two friendly sentences. Parcels are delivered Monday "
    "to Saturday between 8am and 8pm. Tracking numbers start with NW and have ten digits. Customers can change "
    "the delivery address until the parcel leaves the depot, request a safe place, or collect the parcel at a "
    "partner shop within seven days. Refunds for lost parcels are paid within fourteen days of a claim. Never "
    "ask for a password or payment details, and hand over to a human agent when the customer asks for one or "
    "is upset. Business customers have a dedicated line and a monthly invoice. Large items such as furniture "
    "are delivered by two people on a booked day, and the customer receives a text message with a two-hour "
    "window the evening before. Damaged parcels must be reported within forty-eight hours with a photo of the "
    "box and the label. Our opening hours for phone support are 7am to 10pm every day, including holidays."
)
QUESTIONS = (
    "Where is my parcel?",
    "Can I change my address?",
    "Do you deliver on Sunday?",
    "How do I get a refund?",
    "What is a safe place?",
    "Can I talk to a human?",
    "How long do you keep parcels?",
    "Is my number valid?",
)


def shared_prompt_workload(runner: GenerateRunner, n: int) -> list[GenerateItem]:
    """Customer-service turns: the same ~200-token system prompt, a short question, 16 to 64 output tokens."""
    items = []
    for i in range(n):
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"},
        ]
        prompt: Any = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = prompt if isinstance(prompt, list) else prompt["input_ids"]
        params = SamplingParams(max_tokens=OUTPUT_LENGTHS[(i * 7) % 3], temperature=0.0)
        items.append(GenerateItem(list(ids), params))
    return items


def workload(runner: GenerateRunner, n: int) -> list[GenerateItem]:
    """Mixed prompts (one to twelve sentences of context) and output caps (16 to 128 tokens)."""
    items = []
    for i in range(n):
        context = " ".join(f"Note {j}: {TOPICS[(i + j) % len(TOPICS)]} matters." for j in range(1 + (i * 5) % 12))
        messages = [{"role": "user", "content": f"{context} Write a long story about {TOPICS[i % len(TOPICS)]}."}]
        prompt: Any = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = prompt if isinstance(prompt, list) else prompt["input_ids"]
        params = SamplingParams(max_tokens=OUTPUT_LENGTHS[(i * 7) % len(OUTPUT_LENGTHS)], temperature=0.0)
        items.append(GenerateItem(list(ids), params))
    return items


class StaticBatcher:
    """Static batching as HF ``generate`` allows it: a batch is formed, decoded to its longest member, answered."""

    def __init__(self, runner: GenerateRunner, max_batch: int) -> None:
        self._runner = runner
        self._max_batch = max_batch
        self._waiting: asyncio.Queue[tuple[GenerateItem, asyncio.Future[int]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: GenerateItem) -> int:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._waiting.put((item, done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self._waiting.get()]
            while len(batch) < self._max_batch and not self._waiting.empty():
                batch.append(self._waiting.get_nowait())
            counts = await asyncio.to_thread(self._generate, [item for item, _ in batch])
            for (_, done), count in zip(batch, counts, strict=True):
                done.set_result(count)

    @torch.inference_mode()
    def _generate(self, items: list[GenerateItem]) -> list[int]:
        runner = self._runner
        width = max(len(item.prompt_ids) for item in items)
        ids = torch.full((len(items), width), runner.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(items):
            ids[row, width - len(item.prompt_ids) :] = torch.tensor(item.prompt_ids)
            mask[row, width - len(item.prompt_ids) :] = 1
        model: Any = runner.model
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(item.params.max_tokens for item in items),
            do_sample=False,
            pad_token_id=runner.pad_id,
        )
        counts = []
        for row, item in enumerate(items):
            useful = 0  # tokens up to this request's own cap or its end of sequence
            for token in out[row, width:].tolist()[: item.params.max_tokens]:
                if token in runner.eos_ids:
                    break
                useful += 1
            counts.append(useful)
        return counts


class HfContinuous:
    """transformers' own continuous-batching manager (paged attention), for the decision record's comparison."""

    def __init__(self, runner: GenerateRunner) -> None:
        from transformers import GenerationConfig

        model: Any = runner.model
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, max_new_tokens=max(OUTPUT_LENGTHS), pad_token_id=runner.pad_id
        )
        config.eos_token_id = sorted(runner.eos_ids)
        self._manager = model.init_continuous_batching(generation_config=config)
        self._manager.start()
        self._eos = runner.eos_ids

    async def once(self, item: GenerateItem, tally: Tally) -> Result:
        started = time.perf_counter()
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        request_id = uuid.uuid4().hex

        def on_output(output: Any) -> None:
            if output.is_finished() and not done.done():
                done.set_result(list(output.generated_tokens))

        self._manager.register_result_handler(request_id, on_output)
        self._manager.add_request(item.prompt_ids, request_id=request_id, max_new_tokens=item.params.max_tokens)
        tokens = [token for token in await done if token not in self._eos]
        tally.tokens += len(tokens)
        return Result(len(tokens), time.perf_counter() - started)  # run without streaming: TTFT not comparable

    def stop(self) -> None:
        self._manager.stop(block=True)


async def stream_once(engine: GenerationEngine, item: GenerateItem, tally: Tally) -> Result:
    started = time.perf_counter()
    first = 0.0
    sent = 0
    async for event in engine.stream(item):
        if not first:
            first = time.perf_counter() - started
        tokens = event.output_tokens if isinstance(event, GenerateOutput) else event.tokens
        tally.tokens += tokens - sent
        sent = tokens
        if isinstance(event, GenerateOutput):
            return Result(event.output_tokens, first)
    raise AssertionError("no final event")


async def static_once(batcher: StaticBatcher, item: GenerateItem, tally: Tally) -> Result:
    started = time.perf_counter()
    tokens = await batcher.submit(item)
    tally.tokens += tokens
    return Result(tokens, time.perf_counter() - started)  # nothing streams: the first token arrives with the last


def _fill(stats: GenerationStats | None, since: tuple[int, int]) -> float:
    if stats is None or stats.capacity_steps == since[1]:
        return 0.0
    return (stats.row_steps - since[0]) / (stats.capacity_steps - since[1])


async def drive(
    label: str,
    call: Callable[[GenerateItem, Tally], Awaitable[Result]],
    items: list[GenerateItem],
    streams: int,
    stats: GenerationStats | None = None,
) -> Run:
    """Closed loop: each stream sends its next request when its last one ends. Besides the whole run, the
    steady part is measured: up to the moment the work queue runs dry, every stream has a request in flight."""
    queue = list(reversed(items))
    results: list[Result] = []
    tally = Tally()
    steady: list[tuple[int, float, float]] = []
    start = (stats.row_steps, stats.capacity_steps) if stats else (0, 0)

    async def client() -> None:
        while queue:
            item = queue.pop()
            if not queue:
                steady.append((tally.tokens, time.perf_counter() - started, _fill(stats, start)))
            results.append(await call(item, tally))

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(streams)])
    seconds = time.perf_counter() - started
    [(steady_tokens, steady_seconds, steady_fill)] = steady
    ttfts = [r.ttft_s for r in results]
    tokens = sum(r.tokens for r in results)
    return Run(label, tokens, seconds, ttfts, steady_tokens, steady_seconds, _fill(stats, start), steady_fill)


def print_runs(title: str, runs: list[Run]) -> None:
    print(f"\n{title}")
    print(f"{'mode':34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'steady tok/s':>13} {'TTFT p50':>9} {'fill':>5}")
    for run in runs:
        ttft = statistics.median(run.ttfts)
        fill = f"{run.fill:5.2f}" if run.fill else "    -"
        print(
            f"{run.label:34} {run.tokens:7d} {run.seconds:8.1f} {run.tokens_per_s:9.1f}"
            f" {run.steady_tokens_per_s:13.1f} {ttft:8.3f}s {fill}"
        )


def ratio(label: str, ours: float, other: float, note: str = "") -> None:
    print(f"{label:58} {ours / other:5.2f}{note}")


async def main(streams: int, requests: int, threads: int, budget: int, cache_mb: int, with_hf: bool) -> None:
    torch.set_num_threads(threads)
    spec = next(s for s in load_registry() if s.id == MODEL)
    runner = GenerateRunner(cache_mb)
    runner.setup(resolve_model_dir(spec, ROOT / ".cache" / "models"), "cpu", "float32")
    cached, uncached = runner.prefix_cache, PrefixCache(runner.kv_shape, 0)

    def engine(cache: PrefixCache) -> tuple[GenerationEngine, GenerationStats]:
        runner.prefix_cache = cache
        stats = GenerationStats()
        return GenerationEngine(runner, EngineLimits(streams, 2 * streams, budget), stats), stats

    items = workload(runner, requests)
    on, on_stats = engine(cached)
    await stream_once(on, items[0], Tally())  # warm-up (and the chat template's shared prefix cached)
    alone = [await stream_once(on, item, Tally()) for item in items[:8]]
    continuous = await drive("continuous, prefix cache", functools.partial(stream_once, on), items, streams, on_stats)
    off, off_stats = engine(uncached)
    plain = await drive("continuous, no prefix cache", functools.partial(stream_once, off), items, streams, off_stats)
    runner.model.set_attn_implementation("sdpa")  # HF generate runs with transformers' own attention
    batcher = StaticBatcher(runner, streams)
    static = await drive("static batching, HF generate", functools.partial(static_once, batcher), items, streams)
    runs = [continuous, plain, static]
    runner.model.set_attn_implementation(ATTENTION)

    shared = shared_prompt_workload(runner, requests // 2)
    qa_cache = PrefixCache(runner.kv_shape, cache_mb * 2**20)  # starts empty
    qa_on, qa_on_stats = engine(qa_cache)
    qa_cached = await drive("Q&A, prefix cache", functools.partial(stream_once, qa_on), shared, streams, qa_on_stats)
    qa_off, qa_off_stats = engine(uncached)
    qa_plain = await drive(
        "Q&A, no prefix cache", functools.partial(stream_once, qa_off), shared, streams, qa_off_stats
    )
    if with_hf:
        runner.model.set_attn_implementation("sdpa")
        hf = HfContinuous(runner)  # last: it switches the model to paged attention
        runs.append(await drive("HF continuous batching", hf.once, items, streams))
        hf.stop()

    print(f"\n{streams} concurrent streams, {threads} threads, {budget} prefill tokens per step, cache {cache_mb} MiB")
    print_runs(f"Mixed workload: {requests} requests, prompts 30-200 tokens, outputs {OUTPUT_LENGTHS}", runs)
    prompt_tokens = statistics.mean(len(item.prompt_ids) for item in shared)
    print_runs(
        f"Shared system prompt: {len(shared)} requests, prompts ~{prompt_tokens:.0f} tokens", [qa_cached, qa_plain]
    )
    print("(steady: until the work queue ran dry, every stream busy; the whole run includes the drain at the end)")
    print()
    ratio(
        "continuous (prefix cache) ÷ static, tokens/s, whole run",
        continuous.tokens_per_s,
        static.tokens_per_s,
        "  (target ≥ 2)",
    )
    ratio(
        "continuous (prefix cache) ÷ static, tokens/s, steady",
        continuous.steady_tokens_per_s,
        static.steady_tokens_per_s,
    )
    ratio("continuous (no prefix cache) ÷ static, tokens/s, whole run", plain.tokens_per_s, static.tokens_per_s)
    if with_hf:
        ratio("ours ÷ HF continuous batching, tokens/s, whole run", continuous.tokens_per_s, runs[-1].tokens_per_s)
    alone_ttft = statistics.median(r.ttft_s for r in alone)
    loaded_ttft = statistics.median(continuous.ttfts)
    ratio("TTFT p50 under load ÷ alone (continuous, prefix cache)", loaded_ttft, alone_ttft, "  (target ≤ 4)")
    print(f"  ({loaded_ttft * 1000:.0f} ms ÷ {alone_ttft * 1000:.0f} ms)")
    fills = f"{continuous.steady_fill:5.2f} / {continuous.fill:.2f}"
    print(f"{'running-batch fill, steady / whole run (prefix cache)':58} {fills}  (target ≥ 0.9)")
    ttft_on, ttft_off = statistics.median(qa_cached.ttfts), statistics.median(qa_plain.ttfts)
    ratio("Q&A: TTFT p50 without ÷ with the prefix cache", ttft_off, ttft_on, "  (target ≥ 2)")
    print(f"  ({ttft_off * 1000:.0f} ms ÷ {ttft_on * 1000:.0f} ms)")
    ratio(
        "Q&A: tokens/s with ÷ without the prefix cache",
        qa_cached.tokens_per_s,
        qa_plain.tokens_per_s,
        "  (target ≥ 1.3)",
    )
    cache = qa_cache.stats
    print(f"  (prefix cache in the Q&A run: {cache.hits} hits, {cache.misses} misses, {cache.cached_tokens} tokens)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt tokens computed per step")
    parser.add_argument("--cache-mb", type=int, default=256, help="prefix cache size")
    parser.add_argument("--hf-continuous", action="store_true", help="also run transformers' own continuous batching")
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.requests, args.threads, args.prefill_tokens, args.cache_mb, args.hf_continuous))
