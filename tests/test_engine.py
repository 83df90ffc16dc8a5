"""The continuous-batching engine in-process (real SmolLM2, no Ray): a step's packed forward gives the model's own
greedy text whatever shares the step, prompts are prefilled in chunks and together within the per-step budget
while running rows keep decoding, the prefix cache changes no output, a cancelled sequence leaves the running
batch at the next step, and beyond the waiting cap a request is refused with a retry hint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from serving.domain import SamplingParams
from serving.errors import Overloaded, describe
from serving.gateway.router import translate_ray_error
from serving.models.engine import EngineLimits, GenerationEngine
from serving.models.generate import GenerateRunner
from serving.models.prefix_cache import BLOCK_TOKENS, PrefixCache
from serving.models.registry import ModelSpec
from serving.models.sequence import GenerateItem, GenerateOutput, TextChunk
from serving.models.sources import resolve_model_dir
from serving.models.stats import GenerationStats
from serving.settings import Settings


@pytest.fixture(scope="module")
def runner(settings: Settings, specs: list[ModelSpec]) -> GenerateRunner:
    spec = next(s for s in specs if s.id == "smollm2-135m-instruct")
    torch.set_num_threads(1)
    runner = GenerateRunner(prefix_cache_mb=64)
    runner.setup(Path(resolve_model_dir(spec, settings.models_cache)), "cpu", "float32")
    return runner


def _item(runner: GenerateRunner, topic: str, max_tokens: int) -> GenerateItem:
    prompt = runner.tokenizer(f"A story about {topic}:")["input_ids"]
    return GenerateItem(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def _chunks(stream: AsyncIterator[TextChunk | GenerateOutput], n: int) -> None:
    for _ in range(n):
        assert isinstance(await anext(stream), TextChunk)


SYSTEM = "You are the support assistant of Acme Parcel, a delivery company. Answer in one short sentence. " * 3
QUESTIONS = ("What is the capital of France?", "How do I track a parcel?", "What colour is the sky?", "Who are you?")


def _chat(runner: GenerateRunner, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    ids: Any = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


async def _text(engine: GenerationEngine, ids: list[int], max_tokens: int = 16) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    async for event in engine.stream(GenerateItem(ids, params)):
        if isinstance(event, GenerateOutput):
            return event.text
    raise AssertionError("no final event")


def _reference(runner: GenerateRunner, ids: list[int], max_tokens: int = 16) -> str:
    """The model's greedy text with transformers' own generate and attention, one prompt alone."""
    runner.model.set_attn_implementation("sdpa")
    try:
        out = runner.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=runner.pad_id
        )
    finally:
        runner.model.set_attn_implementation("serving_ragged")
    return str(runner.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def _delta(after: dict[str, Any], before: dict[str, Any], *keys: str) -> tuple[int, ...]:
    return tuple(after[key] - before[key] for key in keys)


async def test_chunked_prefill_among_running_streams_gives_the_models_own_text(runner: GenerateRunner) -> None:
    prompts = [_item(runner, topic, 16).prompt_ids for topic in ("a red kite", "glaciers", "chess openings")]
    expected = [_reference(runner, ids) for ids in prompts]
    # 7-token chunks: every prompt takes several steps, sharing them with the others and with running rows.
    engine = GenerationEngine(runner, EngineLimits(8, 8, 7), GenerationStats())
    background = asyncio.create_task(_text(engine, _item(runner, "the tide", 40).prompt_ids, 40))
    assert await asyncio.gather(*[_text(engine, ids) for ids in prompts]) == expected
    await background


async def test_the_prefix_cache_changes_no_output_at_temperature_zero(runner: GenerateRunner) -> None:
    prompts = [_chat(runner, question) for question in QUESTIONS]
    cache, runner.prefix_cache = runner.prefix_cache, PrefixCache(runner.kv_shape, 0)
    try:
        engine = GenerationEngine(runner, EngineLimits(8, 8, 256), GenerationStats())
        without = [await _text(engine, ids) for ids in prompts]
    finally:
        runner.prefix_cache = cache
    engine = GenerationEngine(runner, EngineLimits(8, 8, 256), GenerationStats())
    hits, cached = cache.stats.hits, cache.stats.cached_tokens
    one_by_one = [await _text(engine, ids) for ids in prompts]  # the first computes the shared prefix
    together = await asyncio.gather(*[_text(engine, ids) for ids in prompts])  # all four from the cache
    assert one_by_one == without and together == without
    assert "Paris" in without[0]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts[:2], strict=False)) if a != b)  # tokens all share
    assert cache.stats.hits - hits >= len(prompts) * 2 - 1
    assert cache.stats.cached_tokens - cached >= (len(prompts) * 2 - 1) * (shared // BLOCK_TOKENS) * BLOCK_TOKENS


async def test_a_burst_sharing_a_system_prompt_computes_it_once(runner: GenerateRunner) -> None:
    runner.prefix_cache = PrefixCache(runner.kv_shape, 64 * 2**20)  # empty: nothing of SYSTEM cached yet
    stats = GenerationStats()
    engine = GenerationEngine(runner, EngineLimits(8, 8, 256), stats)
    prompts = [_chat(runner, f"{question} (ticket {i})") for i, question in enumerate(QUESTIONS)]
    await asyncio.gather(*[_text(engine, ids, 4) for ids in prompts])
    shared = next(i for i, (a, b) in enumerate(zip(*prompts[:2], strict=False)) if a != b) // BLOCK_TOKENS
    cache = runner.prefix_cache.stats
    # The first computes the shared blocks; the other three wait for them and take them from the cache.
    assert (cache.misses, cache.hits) == (1, len(prompts) - 1)
    assert cache.cached_tokens == (len(prompts) - 1) * shared * BLOCK_TOKENS
    assert stats.prefill_tokens == sum(map(len, prompts)) - cache.cached_tokens


async def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(runner: GenerateRunner) -> None:
    stats = GenerationStats()
    engine = GenerationEngine(runner, EngineLimits(8, 8, 16), stats)
    running = engine.stream(_item(runner, "a lighthouse keeper", 400))
    await _chunks(running, 1)
    long = runner.tokenizer(" ".join(f"Zebra fact {i}: stripes differ." for i in range(12)))["input_ids"]
    before = stats.snapshot()
    first = await _text(engine, list(long), 1)
    after = stats.snapshot()
    steps, rows, tokens, prefill_steps = _delta(after, before, "steps", "row_steps", "prefill_tokens", "prefill_steps")
    chunks = -(-len(long) // 16)
    assert first and (tokens, prefill_steps) == (len(long), chunks)
    # Every step that computed a chunk also decoded the running row: it never stalled for the long prompt.
    assert steps >= chunks and rows == steps
    await running.aclose()


async def test_joining_prompts_are_prefilled_together_in_one_step(runner: GenerateRunner) -> None:
    stats = GenerationStats()
    engine = GenerationEngine(runner, EngineLimits(8, 8, 256), stats)
    prompts = [_item(runner, f"{topic} in spring", 4).prompt_ids for topic in ("owls", "bees", "hares", "moles")]
    texts = await asyncio.gather(*[_text(engine, ids, 4) for ids in prompts])
    snapshot = stats.snapshot()
    assert all(texts) and snapshot["prefill_steps"] == 1 and snapshot["prefill_tokens"] == sum(map(len, prompts))
    assert snapshot["sizes"] == {0: 1, 4: 3}  # one prefill step, then the four rows decode together


async def test_a_cancelled_sequence_leaves_the_batch_at_the_next_step(runner: GenerateRunner) -> None:
    stats = GenerationStats()
    engine = GenerationEngine(runner, EngineLimits(8, 8, 1024), stats)
    streams = [engine.stream(_item(runner, topic, 200)) for topic in ("owls", "rain", "maps")]
    for stream in streams:
        await _chunks(stream, 2)
    assert engine.running == 3
    steps = stats.steps
    await streams[0].aclose()  # the caller went away
    # Reading on (each chunk is a step) until the engine has let the row go: at most the step already under way
    # when the caller left, then the one that saw it.
    for _ in range(100):
        if engine.running == 2:
            break
        await _chunks(streams[1], 1)
    assert engine.running == 2 and stats.steps - steps <= 2
    for stream in streams[1:]:
        await stream.aclose()


async def test_beyond_the_waiting_cap_a_request_is_refused_with_a_retry_hint(runner: GenerateRunner) -> None:
    engine = GenerationEngine(
        runner, EngineLimits(max_running=1, max_waiting=1, max_prefill_tokens=1024), GenerationStats()
    )
    running = engine.stream(_item(runner, "owls", 200))
    await _chunks(running, 1)
    waiting = engine.stream(_item(runner, "rain", 8))
    waiting_first = asyncio.create_task(anext(waiting))
    await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait for a first chunk
    assert engine.waiting == 1  # queued behind the running sequence
    refused = engine.stream(_item(runner, "maps", 8))
    with pytest.raises(Overloaded) as caught:
        await anext(refused)
    assert caught.value.retry_after_s
    await running.aclose()  # its row frees, so the waiting request runs
    assert isinstance(await waiting_first, TextChunk)
    await waiting.aclose()


def test_a_replica_refusal_crosses_ray_as_the_same_domain_error(ray_models: dict[str, Any]) -> None:
    """What the engine raises inside a replica reaches the gateway as Overloaded with its retry hint."""

    @ray.remote(num_cpus=0)
    def refuse() -> None:
        raise Overloaded("the generation model has 64 requests waiting; retry shortly", retry_after_s=1.0)

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(refuse.remote())
    translated = translate_ray_error(caught.value)
    assert isinstance(translated, Overloaded) and translated.retry_after_s == 1.0
    assert describe(translated).http_status == 503


def _fed(runner: GenerateRunner, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[Any, list[TextChunk]]:
    """A sequence fed ``ids`` one token at a time, as decode steps would: its state and the chunks it emitted."""
    chunks: list[TextChunk] = []
    params = SamplingParams(max_tokens=len(ids) + 1, temperature=0.0, stop=stop)
    seq = runner.preprocess(GenerateItem([1], params))
    seq.on_chunk = chunks.append
    for token in ids:
        runner._advance(seq, token)
        if seq.done:
            break
    return seq, chunks


def test_incremental_detokenization_gives_the_text_of_a_whole_decode(runner: GenerateRunner) -> None:
    tokenizer = runner.tokenizer
    text = "Héllo wörld! 日本語のテキスト 🙂 and   spaces\nnew line."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = next(iter(runner.special_ids - runner.eos_ids))  # skipped in the text, counted as a token
    ids = [*ids[:5], special, *ids[5:]]
    seq, chunks = _fed(runner, ids)
    assert seq.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "".join(c.text for c in chunks) == text
    counts = [c.tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(ids)
    # A token that ends inside a multi-byte character is not counted as sent until the character is complete.
    emoji = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) == 2  # SmolLM2's byte-level BPE splits its four bytes over two tokens
    seq, chunks = _fed(runner, emoji[:1])
    assert seq.text == "" and not chunks
    seq, chunks = _fed(runner, emoji)
    assert seq.text == "🙂" and [c.tokens for c in chunks] == [2]


def test_a_stop_string_split_across_tokens_ends_the_text_before_it(runner: GenerateRunner) -> None:
    ids = runner.tokenizer("The answer is 42. END of story", add_special_tokens=False)["input_ids"]
    seq, chunks = _fed(runner, ids, stop=("END",))
    assert seq.text == "The answer is 42. " and "".join(c.text for c in chunks) == seq.text
    assert seq.finish_reason is not None and seq.finish_reason.value == "stop"
