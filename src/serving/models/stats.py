"""Counts of the batches a replica actually executed, so tests and operators can see batching happen."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class BatchStats:
    sizes: Counter[int] = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.sizes[size] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "batches": sum(self.sizes.values()),
            "items": sum(size * count for size, count in self.sizes.items()),
            "max_batch_size": max(self.sizes, default=0),
            "sizes": dict(self.sizes),
        }
