"""Where a generation replica keeps keys and values: the running batch's rows, and each prompt's own store while
it is prefilled.

Both are one tensor ``[layers, 2 (keys, values), rows, kv_heads, columns, head_dim]``. A row's tokens sit at
columns ``[0, length)`` in position order (left-aligned, so a token's column is its rotary position). A decode
step writes each row's new column at its own length; attention masks columns at or beyond it. A prompt is
prefilled into its own store (in chunks, possibly starting from a cached prefix) and copied into a free batch
row once complete. A row that leaves is replaced by the last row (one row copied), so rows ``[0, n)`` stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.models.sequence import Sequence

_SPARE_COLUMNS = 128  # room added when the buffers grow, so growth is rare
_SPARE_ROWS = 8


@dataclass(frozen=True)
class KvShape:
    """The model's KV geometry."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def zeros(self, rows: int, columns: int) -> torch.Tensor:
        shape = (self.layers, 2, rows, self.kv_heads, columns, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class PromptKv:
    """One prompt's keys and values while it is prefilled: ``filled`` tokens computed (or copied from the prefix
    cache) so far, room for the whole prompt."""

    def __init__(self, shape: KvShape, length: int) -> None:
        self.data = shape.zeros(1, length)
        self.filled = 0


class KvRows:
    """The running batch: its sequences, each row's KV length and latest token, and the shared buffers."""

    def __init__(self, shape: KvShape) -> None:
        self.shape = shape
        self.seqs: list[Sequence] = []
        self.last: list[int] = []  # each row's latest token: the next step's input for that row
        self.data = shape.zeros(0, 0)
        self._lengths = torch.zeros(0, dtype=torch.long, device=shape.device)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens in each row's KV, which is also the position (and column) of the row's next input token."""
        return self._lengths[: len(self.seqs)]

    @property
    def width(self) -> int:
        """Columns a decode step attends over: the longest row plus the column it writes."""
        return int(self.lengths.max().item()) + 1 if self.seqs else 0

    def _ensure(self, rows: int, columns: int) -> None:
        _, _, have_rows, _, have_columns, _ = self.data.shape
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = rows + _SPARE_ROWS if rows > have_rows else have_rows
        new_columns = columns + _SPARE_COLUMNS if columns > have_columns else have_columns
        data = self.shape.zeros(new_rows, new_columns)
        n, used = len(self.seqs), min(self.width, have_columns)
        if n:
            data[:, :, :n, :, :used] = self.data[:, :, :n, :, :used]
        self.data = data
        lengths = torch.zeros(new_rows, dtype=torch.long, device=self.shape.device)
        lengths[:n] = self._lengths[:n]
        self._lengths = lengths

    def reserve_step(self) -> None:
        """Room for one more column in every row (before a decode step writes it)."""
        self._ensure(len(self.seqs), self.width)

    def join(self, seq: Sequence, prompt: PromptKv, token: int) -> None:
        """A sequence whose prompt is prefilled takes the next row; ``token`` is its first generated token."""
        row, length = len(self.seqs), prompt.filled
        self._ensure(row + 1, length + 1)
        self.data[:, :, row, :, :length] = prompt.data[:, :, 0, :, :length]
        self._lengths[row] = length
        self.seqs.append(seq)
        self.last.append(token)

    def advance(self, tokens: list[int]) -> None:
        """After a decode step: each row's KV holds one more token; its new token is the next input."""
        self._lengths[: len(self.seqs)] += 1
        self.last = tokens

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows; each leaving row is overwritten by the last row."""
        for row in sorted(set(range(len(self.seqs))) - set(rows), reverse=True):
            tail = len(self.seqs) - 1
            if row != tail:
                used = int(self._lengths[tail].item())
                self.data[:, :, row, :, :used] = self.data[:, :, tail, :, :used]
                self._lengths[row] = self._lengths[tail]
                self.seqs[row], self.last[row] = self.seqs[tail], self.last[tail]
            del self.seqs[tail], self.last[tail]
        if not self.seqs:  # idle: give the buffers back rather than hold a burst's peak
            self.data = self.shape.zeros(0, 0)
