"""The running batch of a continuous-batching replica: its sequences and one shared, left-padded KV cache.

Rows join (their prefilled cache is left-padded to the batch's width and concatenated) and leave (rows are
selected out) between decode steps. Each row keeps its own next position, so rotary positions stay exact
whatever padding sits to its left; the attention mask hides the padding.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from serving.models.sequence import Sequence


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return functional.pad(tensor, pads)


def _layers(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each full-attention layer with its keys and values; sliding-window or linear-attention caches are not
    batched here."""
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise NotImplementedError(f"continuous batching needs full-attention KV layers, not {type(layer)}")
        layers.append((layer, layer.keys, layer.values))
    return layers


class RunningBatch:
    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.seqs: list[Sequence] = []
        self.cache = DynamicCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # [rows, width]: 1 for real tokens
        self.positions = torch.zeros(0, dtype=torch.long)  # [rows]: the position of each row's next token
        self.last = torch.zeros(0, dtype=torch.long)  # [rows]: each row's latest token, fed to the next step

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def join(self, seqs: list[Sequence], caches: list[DynamicCache], last: torch.Tensor) -> None:
        """Adds prefilled sequences, each with its own one-row cache of its prompt; every row (old and new) is
        left-padded to the widest, in one copy per layer."""
        if not seqs:
            return
        lengths = [len(seq.prompt_ids) for seq in seqs]
        width = max([self.width, *lengths])
        parts = [_layers(cache) for cache in caches]
        if self.seqs:
            parts.insert(0, _layers(self.cache))
        else:
            self.cache = caches[0]  # its layer objects become the batch's; their tensors are replaced below
        for depth, (layer, _, _) in enumerate(_layers(self.cache)):
            layer.keys = torch.cat([_left_pad(part[depth][1], width, 2) for part in parts])
            layer.values = torch.cat([_left_pad(part[depth][2], width, 2) for part in parts])
        device = last.device
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = 1
        self.mask = torch.cat([_left_pad(self.mask.to(device), width, 1), mask])
        self.positions = torch.cat([self.positions.to(device), torch.tensor(lengths, device=device)])
        self.last = torch.cat([self.last.to(device), last])
        self.seqs.extend(seqs)

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows (in order) and drops columns that are padding for every remaining row."""
        if len(rows) == len(self.seqs):
            return
        if not rows:
            self._clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        start = int(torch.nonzero(self.mask.sum(0))[0].item())  # first column some row still uses
        self.mask = self.mask[:, start:]
        for layer, keys, values in _layers(self.cache):
            layer.keys = keys.index_select(0, index)[:, :, start:, :]
            layer.values = values.index_select(0, index)[:, :, start:, :]
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.seqs = [self.seqs[row] for row in rows]
