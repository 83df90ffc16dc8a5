"""The continuous-batching engine in-process (real SmolLM2, no Ray): a cancelled sequence leaves the running
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
from serving.models.registry import ModelSpec
from serving.models.sequence import GenerateItem, GenerateOutput, TextChunk
from serving.models.sources import resolve_model_dir
from serving.models.stats import BatchStats
from serving.settings import Settings


@pytest.fixture(scope="module")
def runner(settings: Settings, specs: list[ModelSpec]) -> GenerateRunner:
    spec = next(s for s in specs if s.id == "smollm2-135m-instruct")
    torch.set_num_threads(1)
    runner = GenerateRunner()
    runner.setup(Path(resolve_model_dir(spec, settings.models_cache)), "cpu", "float32")
    return runner


def _item(runner: GenerateRunner, topic: str, max_tokens: int) -> GenerateItem:
    prompt = runner.tokenizer(f"A story about {topic}:")["input_ids"]
    return GenerateItem(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def _chunks(stream: AsyncIterator[TextChunk | GenerateOutput], n: int) -> None:
    for _ in range(n):
        assert isinstance(await anext(stream), TextChunk)


async def test_a_cancelled_sequence_leaves_the_batch_at_the_next_step(runner: GenerateRunner) -> None:
    engine = GenerationEngine(runner, EngineLimits(8, 8, 1024), BatchStats())
    streams = [engine.stream(_item(runner, topic, 200)) for topic in ("owls", "rain", "maps")]
    for stream in streams:
        await _chunks(stream, 2)
    assert engine.running == 3
    await streams[0].aclose()  # the caller went away
    # Chunk 3 comes from a step that began after the engine saw the cancel-time step through.
    await _chunks(streams[1], 3)
    assert engine.running == 2
    for stream in streams[1:]:
        await stream.aclose()


async def test_beyond_the_waiting_cap_a_request_is_refused_with_a_retry_hint(runner: GenerateRunner) -> None:
    engine = GenerationEngine(runner, EngineLimits(max_running=1, max_waiting=1, max_prefill_tokens=1024), BatchStats())
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
