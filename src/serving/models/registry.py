"""The model registry file (TOML): what each model is, where its files are, how it is batched and scaled; its
aliases (``aliases.py``) and the deprecation and sunset of both (``lifecycle.py``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.domain import Task
from serving.models.aliases import AliasSpec, parse_aliases
from serving.models.lifecycle import Lifecycle, check_id, check_replacements, parse_lifecycle
from serving.models.lifecycle import RegistryError as RegistryError

DEFAULT_REGISTRY = Path(__file__).with_name("default.toml")


@dataclass(frozen=True)
class Source:
    package: str | None = None  # an installed package holding the files
    path: str = ""  # a directory inside the package (or absolute when no package)
    dir: str | None = None  # a local model directory
    gguf: str | None = None  # a GGUF file name inside `package` or `dir`


@dataclass(frozen=True)
class ModelBatching:
    max_batch_size: int = 32  # generation: rows in the running (continuous) batch
    max_wait_ms: float = 5.0  # encoders only: how long a replica batch waits to fill
    max_waiting: int = 64  # generation: requests queued at a replica beyond the running rows, then 503
    max_prefill_tokens: int = 256  # generation: prompt tokens computed per step; longer prompts go in chunks
    prefix_cache_mb: int = 256  # generation: keys and values of shared prompt prefixes kept per replica (0: off)

    def __post_init__(self) -> None:
        # A zero row cap or step budget would leave a generation replica with nothing it may ever run.
        if self.max_batch_size < 1 or self.max_prefill_tokens < 1:
            raise RegistryError("batching.max_batch_size and batching.max_prefill_tokens must be at least 1")
        if self.max_waiting < 0 or self.prefix_cache_mb < 0 or self.max_wait_ms < 0:
            raise RegistryError("batching.max_waiting, prefix_cache_mb and max_wait_ms cannot be negative")


@dataclass(frozen=True)
class ModelAdmission:
    max_concurrency: int = 64  # requests in flight to this model per gateway replica before fair queuing


@dataclass(frozen=True)
class Replicas:
    num_replicas: int = 1
    min_replicas: int | None = None  # set both min and max to autoscale
    max_replicas: int | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1


@dataclass(frozen=True)
class ModelSpec:
    id: str
    task: Task
    source: Source
    device: str = "auto"
    dtype: str = "float32"
    max_input_tokens: int = 256
    hypothesis: str = "This text is about {label}."
    labels: tuple[str, ...] = ()
    runner: str = "transformers"  # "noop" serves zero vectors without running a model (overhead benchmarks)
    batching: ModelBatching = field(default_factory=ModelBatching)
    replicas: Replicas = field(default_factory=Replicas)
    admission: ModelAdmission = field(default_factory=ModelAdmission)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)  # deprecation, sunset, replacement


@dataclass(frozen=True)
class ModelRegistry:
    """The whole registry file: the models (what ``load_registry`` returns) and the aliases over them."""

    models: list[ModelSpec]
    aliases: list[AliasSpec]


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RegistryError(f"{where} must be a table")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise RegistryError(f"{where}: {exc}") from exc


def parse_model_registry(data: dict[str, Any]) -> ModelRegistry:
    specs = _parse_models(data)
    aliases = parse_aliases(data.get("aliases"), specs)
    lifecycles = {spec.id: spec.lifecycle for spec in specs} | {alias.id: alias.lifecycle for alias in aliases}
    check_replacements(lifecycles)
    return ModelRegistry(specs, aliases)


def parse_registry(data: dict[str, Any]) -> list[ModelSpec]:
    """The models of a registry (its aliases are checked too); ``parse_model_registry`` for both."""
    return parse_model_registry(data).models


def _parse_models(data: dict[str, Any]) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    for i, raw in enumerate(data.get("models", [])):
        where = f"models[{i}]"
        try:
            task = Task(raw["task"])
            model_id = str(raw["id"])
        except (KeyError, ValueError) as exc:
            raise RegistryError(f"{where} needs an id and a task (embed/classify/generate): {exc}") from exc
        check_id(model_id, where)
        source = _build(Source, raw.get("source"), f"{where}.source")
        if not (source.package or source.dir or source.path):
            raise RegistryError(f"{where}.source needs package, dir or path")
        specs.append(
            ModelSpec(
                id=model_id,
                task=task,
                source=source,
                device=str(raw.get("device", "auto")),
                dtype=str(raw.get("dtype", "float32")),
                max_input_tokens=int(raw.get("max_input_tokens", 256)),
                hypothesis=str(raw.get("hypothesis", ModelSpec.hypothesis)),
                labels=tuple(raw.get("labels", ())),
                runner=str(raw.get("runner", "transformers")),
                batching=_build(ModelBatching, raw.get("batching"), f"{where}.batching"),
                replicas=_build(Replicas, raw.get("replicas"), f"{where}.replicas"),
                admission=_build(ModelAdmission, raw.get("admission"), f"{where}.admission"),
                lifecycle=parse_lifecycle(raw, where),
            )
        )
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids) or not ids:
        raise RegistryError(f"the registry needs at least one model and unique ids; got {ids}")
    return specs


def load_model_registry(path: Path | None = None) -> ModelRegistry:
    """The models and aliases of the registry file at ``path`` (None: the built-in one)."""
    target = path or DEFAULT_REGISTRY
    try:
        data = tomllib.loads(target.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read model registry {target}: {exc}") from exc
    return parse_model_registry(data)


def load_registry(path: Path | None = None) -> list[ModelSpec]:
    """The models of the registry file (its aliases are checked too); ``load_model_registry`` for both."""
    return load_model_registry(path).models
