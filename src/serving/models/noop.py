"""A model that does no work: fixed-width zero vectors. Measures the serving stack's own overhead."""

from __future__ import annotations

from pathlib import Path


class NoopRunner:
    def __init__(self, dimensions: int = 384) -> None:
        self.dimensions = dimensions

    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        """Loads nothing."""

    def preprocess(self, item: str) -> str:
        return item

    def predict(self, batch: list[str]) -> list[list[float]]:
        return [[0.0] * self.dimensions for _ in batch]

    def postprocess(self, output: list[float]) -> list[float]:
        return output
