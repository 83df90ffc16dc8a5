"""Sentence embeddings: mean pooling over a transformers encoder, L2-normalized (as sentence-transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from serving.models.runner import resolve_device, resolve_dtype


class EmbedRunner:
    def __init__(self, max_input_tokens: int) -> None:
        self.max_input_tokens = max_input_tokens

    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=resolve_dtype(dtype, self.device))
        self.model.to(self.device).eval()

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def preprocess(self, item: str) -> str:
        return item

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        # The gateway rejects over-long texts; truncation here only guards the replica.
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_input_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)

    def predict(self, batch: list[str]) -> list[np.ndarray]:
        return list(self.encode(batch).cpu().numpy())

    def postprocess(self, output: np.ndarray) -> np.ndarray:
        return output
