"""A model that does no work: fixed-width zero vectors. Measures the serving stack's own overhead."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NoopRunner:
    def __init__(self, dimensions: int = 384) -> None:
        self.dimensions = dimensions

    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        """Loads nothing."""

    def preprocess(self, item: str) -> str:
        return item

    def predict(self, batch: list[str]) -> list[np.ndarray]:
        return list(np.zeros((len(batch), self.dimensions), dtype=np.float32))

    def postprocess(self, output: np.ndarray) -> np.ndarray:
        return output
