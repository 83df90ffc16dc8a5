"""The generation replica's KV storage without a model: running rows left-aligned in shared buffers, the prefix
cache (exact token-prefix matches only, whole blocks, bounded by bytes, least recently used first), and the
registry's checks of the engine's limits."""

from __future__ import annotations

import pytest
import torch

from serving.domain import SamplingParams
from serving.models.kvcache import KvRows, KvShape, PromptKv
from serving.models.prefix_cache import BLOCK_TOKENS, PrefixCache
from serving.models.registry import RegistryError, parse_registry
from serving.models.sequence import Sequence

SHAPE = KvShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def _prompt(length: int, fill: float) -> PromptKv:
    """A computed prompt whose token ``t`` has keys ``fill + t`` (values the negative)."""
    prompt = PromptKv(SHAPE, length)
    tokens = fill + torch.arange(length, dtype=torch.float32)[None, None, :, None]
    prompt.data[:, 0, 0] = tokens.expand(SHAPE.layers, SHAPE.kv_heads, length, SHAPE.head_dim)
    prompt.data[:, 1, 0] = -prompt.data[:, 0, 0]
    prompt.filled = length
    return prompt


def _seq(length: int) -> Sequence:
    return Sequence(prompt_ids=list(range(length)), params=SamplingParams(max_tokens=8), generator=None)


def test_rows_join_left_aligned_advance_together_and_a_leaving_row_is_replaced_by_the_last() -> None:
    rows = KvRows(SHAPE)
    seqs = [_seq(n) for n in (3, 5, 2)]
    for i, seq in enumerate(seqs):
        rows.join(seq, _prompt(len(seq.prompt_ids), 10.0 * i), 100 + i)
    assert rows.lengths.tolist() == [3, 5, 2] and rows.width == 6 and rows.last == [100, 101, 102]
    assert rows.data[1, 0, 1, 0, :5, 0].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    rows.advance([200, 201, 202])
    assert rows.lengths.tolist() == [4, 6, 3] and rows.last == [200, 201, 202]
    rows.keep([1, 2])  # row 0 leaves; the last row takes its place
    assert rows.seqs == [seqs[2], seqs[1]] and rows.last == [202, 201] and rows.lengths.tolist() == [3, 6]
    assert rows.data[0, 0, 0, 0, :2, 0].tolist() == [20.0, 21.0]
    rows.keep([])
    assert len(rows) == 0 and rows.width == 0


def test_the_buffers_grow_keeping_what_the_rows_hold() -> None:
    rows = KvRows(SHAPE)
    rows.join(_seq(4), _prompt(4, 1.0), 7)
    long = 300  # beyond the spare columns of the first allocation
    rows.join(_seq(long), _prompt(long, 2.0), 8)
    rows.reserve_step()
    assert rows.data.shape[4] > long and rows.data[0, 0, 0, 0, :4, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert rows.data[0, 1, 1, 0, long - 1, 0].item() == -(2.0 + long - 1)
    for step in range(200):  # decode steps past the spare columns: each reserves its column, writes, advances
        rows.reserve_step()
        rows.data[:, :, :2, :, rows.lengths] = float(1000 + step)
        rows.advance([7, 8])
    assert rows.lengths.tolist() == [204, long + 200] and rows.data.shape[4] >= long + 201
    assert rows.data[0, 0, 0, 0, :5, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 1000.0]
    assert rows.data[0, 0, 1, 0, long + 199, 0].item() == 1199.0


def test_a_prompt_reuses_exactly_the_cached_blocks_of_its_own_prefix() -> None:
    cache = PrefixCache(SHAPE, max_bytes=1 << 20)
    first = list(range(3 * BLOCK_TOKENS + 5))
    cache.store(first, _prompt(len(first), 0.0))
    assert cache.stats.blocks == 3
    # Shares the first two blocks, then differs in the third.
    second = first[: 2 * BLOCK_TOKENS] + [999] * (BLOCK_TOKENS + 3)
    prompt = PromptKv(SHAPE, len(second))
    assert cache.attach(second, prompt) == 2 * BLOCK_TOKENS == prompt.filled
    assert torch.equal(
        prompt.data[:, :, :, :, : prompt.filled], _prompt(len(first), 0.0).data[:, :, :, :, : prompt.filled]
    )
    # Another first block means no hit at all, even with later blocks equal.
    third = [5, *first[1:]]
    assert cache.attach(third, PromptKv(SHAPE, len(third))) == 0
    assert (cache.stats.hits, cache.stats.misses, cache.stats.cached_tokens) == (1, 1, 2 * BLOCK_TOKENS)


def test_at_least_one_prompt_token_is_always_left_to_compute() -> None:
    cache = PrefixCache(SHAPE, max_bytes=1 << 20)
    ids = list(range(2 * BLOCK_TOKENS))
    cache.store(ids, _prompt(len(ids), 0.0))
    assert cache.attach(ids, PromptKv(SHAPE, len(ids))) == BLOCK_TOKENS  # not both blocks: logits need a token
    assert cache.attach([*ids, 1], PromptKv(SHAPE, len(ids) + 1)) == 2 * BLOCK_TOKENS


def test_the_cache_is_bounded_and_evicts_the_least_recently_used_continuation_first() -> None:
    block_bytes = SHAPE.bytes_per_token() * BLOCK_TOKENS
    cache = PrefixCache(SHAPE, max_bytes=3 * block_bytes)
    a = list(range(2 * BLOCK_TOKENS + 1))
    b = [*a[:BLOCK_TOKENS], *range(500, 500 + BLOCK_TOKENS + 1)]  # same first block, another second
    cache.store(a, _prompt(len(a), 0.0))
    cache.store(b, _prompt(len(b), 0.0))
    assert cache.stats.blocks == 3 and cache.stats.bytes == 3 * block_bytes
    cache.attach(a, PromptKv(SHAPE, len(a)))  # a's blocks are now the most recent
    c = list(range(900, 900 + BLOCK_TOKENS + 1))
    cache.store(c, _prompt(len(c), 0.0))  # one block too many: b's second block goes (a leaf, least recent)
    assert cache.stats.blocks == 3
    assert cache.attach(a, PromptKv(SHAPE, len(a))) == 2 * BLOCK_TOKENS
    assert cache.attach(b, PromptKv(SHAPE, len(b))) == BLOCK_TOKENS
    assert cache.attach(c, PromptKv(SHAPE, len(c))) == BLOCK_TOKENS


def test_a_cache_of_zero_bytes_is_off() -> None:
    cache = PrefixCache(SHAPE, max_bytes=0)
    ids = list(range(3 * BLOCK_TOKENS))
    cache.store(ids, _prompt(len(ids), 0.0))
    assert not cache.enabled and cache.attach(ids, PromptKv(SHAPE, len(ids))) == 0 and cache.stats.blocks == 0


def test_an_idle_batch_gives_its_buffers_back() -> None:
    rows = KvRows(SHAPE)
    rows.join(_seq(40), _prompt(40, 1.0), 7)
    assert rows.data.numel() > 0
    rows.keep([])
    assert rows.data.numel() == 0 and rows.width == 0


@pytest.mark.parametrize("bad", [{"max_prefill_tokens": 0}, {"max_batch_size": 0}, {"prefix_cache_mb": -1}])
def test_the_registry_refuses_batching_a_generation_replica_could_never_run(bad: dict[str, int]) -> None:
    raw = {"id": "gen", "task": "generate", "source": {"dir": "/models/gen"}, "batching": bad}
    with pytest.raises(RegistryError, match="batching"):
        parse_registry({"models": [raw]})
