"""The hook contract model code implements; runners never see queues, Ray, HTTP or gRPC.

``setup`` loads weights once per replica; ``preprocess`` turns one request item into model input;
``predict`` runs one batch; ``postprocess`` turns one output into the wire-neutral result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Runner(Protocol):
    def setup(self, model_dir: Path, device: str, dtype: str) -> None: ...

    def preprocess(self, item: Any) -> Any: ...

    def predict(self, batch: list[Any]) -> list[Any]: ...

    def postprocess(self, output: Any) -> Any: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}; got {dtype!r}")
    # Half precision is a GPU setting; on CPU it is slower and less accurate, so fall back.
    return table[dtype] if device.type == "cuda" else torch.float32


def run_batch(runner: Runner, items: list[Any], max_batch_size: int) -> list[Any]:
    """preprocess → predict in chunks of at most ``max_batch_size`` → postprocess."""
    inputs = [runner.preprocess(item) for item in items]
    outputs: list[Any] = []
    for start in range(0, len(inputs), max_batch_size):
        outputs.extend(runner.predict(inputs[start : start + max_batch_size]))
    return [runner.postprocess(output) for output in outputs]
