"""A replica's prefix cache: the keys and values of prompt prefixes already computed, reused by later prompts
that start with the same tokens (the chat template and a partner's system prompt, typically).

Prefixes are stored in blocks of ``BLOCK_TOKENS`` tokens in a trie keyed by the blocks' token ids, so a block
is found only under the exact tokens before it: its keys and values depend on nothing else (attention is causal
and positions start at 0), which is what makes reuse exact. Bounded in bytes; the least recently used block
with no cached continuation is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from serving.models.kvcache import KvShape, PromptKv

BLOCK_TOKENS = 16


@dataclass(eq=False)
class _Block:
    tokens: tuple[int, ...]
    parent: _Block | None
    data: torch.Tensor | None  # [layers, 2, kv_heads, BLOCK_TOKENS, head_dim]; None only for the root
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)


@dataclass
class PrefixCacheStats:
    hits: int = 0  # prompts that reused at least one cached block
    misses: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the cache instead of computed
    blocks: int = 0
    bytes: int = 0


class PrefixCache:
    def __init__(self, shape: KvShape, max_bytes: int) -> None:
        self._block_bytes = shape.bytes_per_token() * BLOCK_TOKENS
        self._max_blocks = max_bytes // self._block_bytes
        self._root = _Block((), None, None)
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # oldest first
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self._max_blocks > 0

    def attach(self, ids: Sequence[int], prompt: PromptKv) -> int:
        """Copies the longest cached prefix of ``ids`` (whole blocks, at least one token left to compute) into
        ``prompt``; returns how many tokens it covers."""
        if not self.enabled:
            return 0
        chain: list[_Block] = []
        node = self._root
        for start in range(0, len(ids) - 1 - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            child = node.children.get(tuple(ids[start : start + BLOCK_TOKENS]))
            if child is None:
                break
            chain.append(child)
            node = child
        for depth, block in enumerate(chain):
            assert block.data is not None
            prompt.data[:, :, 0, :, depth * BLOCK_TOKENS : (depth + 1) * BLOCK_TOKENS] = block.data
        for block in reversed(chain):  # ancestors end up more recent than their continuations
            self._lru.move_to_end(id(block))
        cached = len(chain) * BLOCK_TOKENS
        prompt.filled = cached
        if cached:
            self.stats.hits += 1
            self.stats.cached_tokens += cached
        else:
            self.stats.misses += 1
        return cached

    def store(self, ids: Sequence[int], prompt: PromptKv) -> None:
        """Caches every whole block of ``ids`` that ``prompt`` has computed and the cache lacks."""
        if not self.enabled:
            return
        node = self._root
        for start in range(0, prompt.filled - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            key = tuple(ids[start : start + BLOCK_TOKENS])
            child = node.children.get(key)
            if child is None:
                data = prompt.data[:, :, 0, :, start : start + BLOCK_TOKENS].clone()
                child = node.children[key] = _Block(key, node, data)
                self._lru[id(child)] = child
                self.stats.blocks += 1
            node = child
        while self.stats.blocks > self._max_blocks:
            self._evict_one()
        self.stats.bytes = self.stats.blocks * self._block_bytes

    def _evict_one(self) -> None:
        victim = next(block for block in self._lru.values() if not block.children)
        del self._lru[id(victim)]
        assert victim.parent is not None
        del victim.parent.children[victim.tokens]
        self.stats.blocks -= 1
