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


@dataclass
class GenerationStats(BatchStats):
    """A generation replica's steps: running rows per step (``sizes``), prompt tokens computed per step, how
    full the running batch was, and the prefix cache's use (filled in by the replica when asked)."""

    steps: int = 0
    row_steps: int = 0  # running rows summed over steps
    capacity_steps: int = 0  # the row cap summed over steps
    prefill_tokens: int = 0
    prefill_steps: int = 0  # steps that computed prompt tokens

    def record_step(self, rows: int, prefill_tokens: int, cap: int) -> None:
        self.record(rows)
        self.steps += 1
        self.row_steps += rows
        self.capacity_steps += cap
        self.prefill_tokens += prefill_tokens
        self.prefill_steps += prefill_tokens > 0

    def snapshot(self) -> dict[str, object]:
        return {
            **super().snapshot(),
            "steps": self.steps,
            "row_steps": self.row_steps,
            "capacity_steps": self.capacity_steps,
            "prefill_tokens": self.prefill_tokens,
            "prefill_steps": self.prefill_steps,
        }
