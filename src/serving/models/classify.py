"""Zero-shot classification over an embedding model: each label becomes a hypothesis sentence and the
text's label scores are a softmax over cosine similarities."""

from __future__ import annotations

from pathlib import Path

import torch

from serving.domain import Classification
from serving.models.embed import EmbedRunner

# Cosine similarities of MiniLM sit in a narrow band; this temperature spreads them into usable scores.
_SCALE = 20.0
_LABEL_CACHE_SIZE = 4096

ClassifyItem = tuple[str, tuple[str, ...]]


class ZeroShotRunner:
    def __init__(self, max_input_tokens: int, hypothesis: str) -> None:
        self.embedder = EmbedRunner(max_input_tokens)
        self.hypothesis = hypothesis
        self._label_vectors: dict[str, torch.Tensor] = {}

    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        self.embedder.setup(model_dir, device, dtype)

    def preprocess(self, item: ClassifyItem) -> ClassifyItem:
        return item

    def _labels(self, labels: list[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self._label_vectors]
        if missing:
            if len(self._label_vectors) + len(missing) > _LABEL_CACHE_SIZE:
                self._label_vectors.clear()
            vectors = self.embedder.encode([self.hypothesis.format(label=label) for label in missing])
            self._label_vectors.update(zip(missing, vectors, strict=True))
        return torch.stack([self._label_vectors[label] for label in labels])

    def predict(self, batch: list[ClassifyItem]) -> list[Classification]:
        texts = self.embedder.encode([text for text, _ in batch])
        results: list[Classification] = []
        for vector, (_, labels) in zip(texts, batch, strict=True):
            label_list = list(labels)
            scores = torch.softmax(self._labels(label_list) @ vector * _SCALE, dim=0).tolist()
            ranked = sorted(zip(label_list, scores, strict=True), key=lambda pair: -pair[1])
            results.append(Classification(label=ranked[0][0], scores=ranked))
        return results

    def postprocess(self, output: Classification) -> Classification:
        return output
