"""The running batch of a continuous-batching replica: its sequences and one shared KV cache in preallocated
buffers.

Layout: every layer's keys and values live in a buffer ``[rows, heads, columns, head_dim]``; the batch uses rows
``[0, len)`` and columns ``[start, end)``, each row's tokens right-aligned at ``end`` (left padding, hidden by the
attention mask). A decode step writes one column in place, so the per-step cost does not grow with the cache
(transformers' DynamicCache concatenates, i.e. copies the whole cache, every step). A row that leaves is replaced
by the last row (one row copied); a row that joins is written into the next free row. Each row keeps its own next
position, so rotary positions stay exact whatever padding sits to its left.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from serving.models.sequence import Sequence

_SPARE_COLUMNS = 128  # room added on each side when the buffers grow, so growth is rare
_SPARE_ROWS = 8


def _prompt_states(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A one-row prefill cache's keys and values per layer; sliding-window or linear-attention caches are not
    batched here."""
    states = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise NotImplementedError(f"continuous batching needs full-attention KV layers, not {type(layer)}")
        states.append((layer.keys, layer.values))
    return states


class _Geometry:
    """Which part of the buffers is in use; shared by the batch and its layers."""

    def __init__(self) -> None:
        self.rows = 0
        self.start = 0
        self.end = 0


class _BufferLayer(DynamicLayer):
    """A cache layer over the shared buffers. ``update`` writes the step's column(s) at ``end`` in place and
    returns views; the batch advances ``end`` once the whole forward pass is done."""

    def __init__(self, geometry: _Geometry, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.geometry = geometry
        self.key_buffer, self.value_buffer = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.refresh()

    def refresh(self, extra: int = 0) -> None:
        g = self.geometry
        self.keys = self.key_buffer[: g.rows, :, g.start : g.end + extra]
        self.values = self.value_buffer[: g.rows, :, g.start : g.end + extra]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        g, n = self.geometry, key_states.shape[-2]
        self.key_buffer[: g.rows, :, g.end : g.end + n] = key_states
        self.value_buffer[: g.rows, :, g.end : g.end + n] = value_states
        self.refresh(extra=n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.geometry.end - self.geometry.start


class RunningBatch:
    def __init__(self) -> None:
        self.seqs: list[Sequence] = []
        self.positions: list[int] = []  # each row's next token position
        self.last: list[int] = []  # each row's latest token, fed to the next step
        self._geometry = _Geometry()
        self.cache = DynamicCache()
        self._mask = torch.zeros((0, 0), dtype=torch.long)  # [rows, columns] buffer: 1 where a row has a token

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        return self._geometry.end - self._geometry.start

    @property
    def mask(self) -> torch.Tensor:
        g = self._geometry
        return self._mask[: g.rows, g.start : g.end]

    def _layers(self) -> list[_BufferLayer]:
        return [layer for layer in self.cache.layers if isinstance(layer, _BufferLayer)]

    def _allocate(self, rows: int, left: int, right: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """New buffers with ``rows`` rows, ``left`` free columns before the used ones and ``right`` after."""
        g = self._geometry
        width = g.end - g.start
        columns = left + width + right
        mask = torch.zeros((rows, columns), dtype=torch.long, device=like[0][0].device)
        mask[: g.rows, left : left + width] = self.mask
        old = self._layers()
        layers: list[DynamicLayer] = []
        for depth, (keys, _) in enumerate(like):
            shape = (rows, keys.shape[1], columns, keys.shape[3])
            key_buffer = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            value_buffer = torch.zeros_like(key_buffer)
            if old:
                key_buffer[: g.rows, :, left : left + width] = old[depth].key_buffer[: g.rows, :, g.start : g.end]
                value_buffer[: g.rows, :, left : left + width] = old[depth].value_buffer[: g.rows, :, g.start : g.end]
            layers.append(_BufferLayer(g, key_buffer, value_buffer))
        self._mask = mask
        g.start, g.end = left, left + width
        self.cache.layers = layers  # type: ignore[assignment]
        self._refresh()

    def _refresh(self) -> None:
        for layer in self._layers():
            layer.refresh()

    def join(self, seqs: list[Sequence], caches: list[DynamicCache], last: list[int]) -> None:
        """Adds prefilled sequences, each with its own one-row cache of its prompt, right-aligned at ``end``."""
        if not seqs:
            return
        states = [_prompt_states(cache) for cache in caches]
        lengths = [len(seq.prompt_ids) for seq in seqs]
        longest = max(lengths)
        g = self._geometry
        if not self.seqs:
            g.rows, g.start = 0, g.end
        rows_buffer, _ = self._mask.shape
        if g.rows + len(seqs) > rows_buffer or g.end - longest < 0:
            rows = max(rows_buffer, g.rows + len(seqs) + _SPARE_ROWS)
            self._allocate(rows, max(0, longest - self.width) + _SPARE_COLUMNS, _SPARE_COLUMNS, states[0])
        new_start = min(g.start, g.end - longest)
        self._mask[: g.rows, new_start : g.start] = 0  # columns the old rows never used
        g.start = new_start
        layers = self._layers()
        for offset, (seq, length, prompt) in enumerate(zip(seqs, lengths, states, strict=True)):
            row = g.rows + offset
            self._mask[row] = 0
            self._mask[row, g.end - length : g.end] = 1
            for layer, (keys, values) in zip(layers, prompt, strict=True):
                layer.key_buffer[row, :, g.end - length : g.end] = keys[0]
                layer.value_buffer[row, :, g.end - length : g.end] = values[0]
            self.seqs.append(seq)
            self.positions.append(length)
        self.last.extend(last)
        g.rows += len(seqs)
        self._refresh()

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and position ids for one decode step (room for its column is ensured)."""
        g = self._geometry
        if g.end >= self._mask.shape[1]:
            like = [(layer.key_buffer, layer.value_buffer) for layer in self._layers()]
            self._allocate(self._mask.shape[0], _SPARE_COLUMNS, _SPARE_COLUMNS, like)
        self._mask[: g.rows, g.end] = 1
        device = self._mask.device
        ids = torch.tensor(self.last, dtype=torch.long, device=device).unsqueeze(1)
        positions = torch.tensor(self.positions, dtype=torch.long, device=device).unsqueeze(1)
        return ids, self._mask[: g.rows, g.start : g.end + 1], positions

    def advance(self, tokens: list[int]) -> None:
        """After a decode step: its column is part of the cache; each row's next input is its new token."""
        self._geometry.end += 1
        self.positions = [position + 1 for position in self.positions]
        self.last = tokens
        self._refresh()

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows: each leaving row is overwritten by the last row; then columns that are padding
        for every remaining row are dropped from the front."""
        g = self._geometry
        leaving = sorted(set(range(g.rows)) - set(rows), reverse=True)
        if not leaving:
            return
        layers = self._layers()
        for row in leaving:
            tail = g.rows - 1
            if row != tail:  # the last row moves into the leaving row's place
                self._mask[row] = self._mask[tail]
                for layer in layers:
                    layer.key_buffer[row, :, g.start : g.end] = layer.key_buffer[tail, :, g.start : g.end]
                    layer.value_buffer[row, :, g.start : g.end] = layer.value_buffer[tail, :, g.start : g.end]
            self.seqs[row] = self.seqs[tail]  # (no-ops when the leaving row is the last)
            self.positions[row] = self.positions[tail]
            self.last[row] = self.last[tail]
            del self.seqs[tail], self.positions[tail], self.last[tail]
            g.rows = tail
        if g.rows:
            used = torch.nonzero(self.mask.sum(0))
            g.start += int(used[0].item())
        else:
            g.start = g.end
        self._refresh()
