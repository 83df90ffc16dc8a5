"""The running batch's shared KV cache: rows join left-padded to the widest and leave without a trace."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from serving.domain import SamplingParams
from serving.models.kvbatch import RunningBatch
from serving.models.sequence import Sequence

HEADS, DIM, LAYERS = 2, 4, 3


def _prefilled(length: int, fill: float) -> tuple[Sequence, DynamicCache]:
    """A sequence with a one-row cache of its prompt whose every entry is ``fill``."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        states = torch.full((1, HEADS, length, DIM), fill)
        cache.update(states, states + 1, layer)
    return Sequence(prompt_ids=list(range(length)), params=SamplingParams(max_tokens=8), generator=None), cache


def test_rows_join_left_padded_and_leaving_rows_trim_unused_columns() -> None:
    batch = RunningBatch()
    short, short_cache = _prefilled(3, 1.0)
    long, long_cache = _prefilled(5, 2.0)
    batch.join([short], [short_cache], torch.tensor([7]))
    batch.join([long], [long_cache], torch.tensor([8]))
    assert batch.width == 5 and batch.positions.tolist() == [3, 5] and batch.last.tolist() == [7, 8]
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = batch.cache.layers[LAYERS - 1].keys
    assert keys is not None and keys.shape == (2, HEADS, 5, DIM)
    assert keys[0, :, :2].abs().sum() == 0 and bool((keys[0, :, 2:] == 1.0).all())
    batch.keep([0])  # the long row leaves: the two columns only it used go too
    assert batch.width == 3 and batch.seqs == [short] and batch.positions.tolist() == [3]
    values = batch.cache.layers[0].values
    assert values is not None and values.shape == (1, HEADS, 3, DIM) and bool((values == 2.0).all())
    batch.keep([])
    assert len(batch) == 0 and batch.width == 0
