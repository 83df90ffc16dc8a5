"""The running batch's shared KV buffers: rows join right-aligned (left-padded) and leave without a trace."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from serving.domain import SamplingParams
from serving.models.kvbatch import RunningBatch
from serving.models.sequence import Sequence

HEADS, DIM, LAYERS = 2, 4, 3


def _prefilled(length: int, fill: float) -> tuple[Sequence, DynamicCache]:
    """A sequence with a one-row cache of its prompt whose every entry is ``fill`` (values ``fill + 1``)."""
    cache = DynamicCache()
    for layer in range(LAYERS):
        states = torch.full((1, HEADS, length, DIM), fill)
        cache.update(states, states + 1, layer)
    return Sequence(prompt_ids=list(range(length)), params=SamplingParams(max_tokens=8), generator=None), cache


def _keys(batch: RunningBatch, layer: int) -> torch.Tensor:
    keys = batch.cache.layers[layer].keys
    assert keys is not None
    return keys


def test_rows_join_left_padded_and_leaving_rows_trim_unused_columns() -> None:
    batch = RunningBatch()
    short, short_cache = _prefilled(3, 1.0)
    long, long_cache = _prefilled(5, 2.0)
    batch.join([short], [short_cache], [7])
    batch.join([long], [long_cache], [8])
    assert batch.width == 5 and batch.positions == [3, 5] and batch.last == [7, 8]
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = _keys(batch, LAYERS - 1)
    assert keys.shape == (2, HEADS, 5, DIM) and bool((keys[0, :, 2:] == 1.0).all())
    batch.keep([0])  # the long row leaves: the two columns only it used go too
    assert batch.width == 3 and batch.seqs == [short] and batch.positions == [3]
    assert bool((batch.cache.layers[0].values == 2.0).all())  # type: ignore[union-attr]
    batch.keep([])
    assert len(batch) == 0 and batch.width == 0


def test_a_decode_step_writes_one_column_in_place_and_a_leaving_row_is_replaced_by_the_last() -> None:
    batch = RunningBatch()
    rows = [_prefilled(2 + i, float(i)) for i in range(3)]
    batch.join([seq for seq, _ in rows], [cache for _, cache in rows], [10, 11, 12])
    ids, mask, positions = batch.step_inputs()
    assert ids.flatten().tolist() == [10, 11, 12] and positions.flatten().tolist() == [2, 3, 4]
    assert mask.shape == (3, 5) and bool((mask[:, -1] == 1).all())
    for depth in range(LAYERS):  # what a forward pass does: one new column per layer
        step = torch.full((3, HEADS, 1, DIM), 9.0)
        batch.cache.layers[depth].update(step, step)
    batch.advance([20, 21, 22])
    assert batch.width == 5 and batch.positions == [3, 4, 5] and batch.last == [20, 21, 22]
    assert bool((_keys(batch, 0)[:, :, -1] == 9.0).all())
    batch.keep([1, 2])  # row 0 leaves; row 2 takes its place
    assert batch.seqs == [rows[2][0], rows[1][0]] and batch.last == [22, 21] and batch.positions == [5, 4]
    assert bool((_keys(batch, 0)[0, :, :4] == 2.0).all()) and bool((_keys(batch, 0)[1, :, 1:4] == 1.0).all())
    assert batch.mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
