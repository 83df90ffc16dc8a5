"""The registry's ``[[aliases]]``: names that point at one model, or split traffic between models by weight.

```toml
[[aliases]]
id = "embed-small"
targets = [{ model = "minilm-l6", weight = 90 }, { model = "minilm-l6@2026-11", weight = 10 }]
# deprecated = 2026-12-01, sunset = 2027-03-01, replacement = "embed-base"   (optional, as on models)
```

An alias targets models only (never another alias), all of one task. Which target serves a call is decided in the
gateway (``gateway/catalog.py``), sticky per request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.models.lifecycle import LIFECYCLE_KEYS, Lifecycle, RegistryError, check_id, parse_lifecycle

if TYPE_CHECKING:
    from serving.models.registry import ModelSpec

_ALIAS_KEYS = frozenset({"id", "targets", *LIFECYCLE_KEYS})


@dataclass(frozen=True)
class AliasTarget:
    model: str
    weight: int = 1  # relative: 90 and 10 send 90 % and 10 % of the calls


@dataclass(frozen=True)
class AliasSpec:
    id: str
    targets: tuple[AliasTarget, ...]
    lifecycle: Lifecycle = field(default_factory=Lifecycle)


def _target(raw: Any, where: str, models: dict[str, ModelSpec]) -> AliasTarget:
    if not isinstance(raw, dict) or set(raw) - {"model", "weight"} or "model" not in raw:
        raise RegistryError(f'{where} must be a table {{ model = "<model id>", weight = <positive integer> }}')
    model, weight = raw["model"], raw.get("weight", 1)
    if model not in models:
        raise RegistryError(
            f"{where}.model {model!r} is not a model of the registry (aliases target models, not other aliases);"
            f" the models are {sorted(models)}"
        )
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise RegistryError(f"{where}.weight must be a positive integer; got {weight!r}")
    return AliasTarget(model, weight)


def _alias(raw: Any, where: str, models: dict[str, ModelSpec]) -> AliasSpec:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where} must be a table")
    unknown = set(raw) - _ALIAS_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}; an alias has {sorted(_ALIAS_KEYS)}")
    alias_id = raw.get("id")
    if not isinstance(alias_id, str):
        raise RegistryError(f"{where} needs an id (a string)")
    check_id(alias_id, where)
    if alias_id in models:
        raise RegistryError(f"{where}: alias {alias_id!r} has the id of a model; ids are shared by models and aliases")
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, list) or not targets_raw:
        raise RegistryError(f"{where}.targets must list at least one {{ model, weight }}")
    targets = tuple(_target(t, f"{where}.targets[{i}]", models) for i, t in enumerate(targets_raw))
    names = [t.model for t in targets]
    if len(set(names)) != len(names):
        raise RegistryError(f"{where}.targets name a model twice: {names}")
    tasks = {models[name].task.value for name in names}
    if len(tasks) > 1:
        raise RegistryError(f"{where}: the targets of alias {alias_id!r} mix tasks {sorted(tasks)}; use one task")
    return AliasSpec(alias_id, targets, parse_lifecycle(raw, where))


def _check_announcement(alias: AliasSpec, models: dict[str, ModelSpec]) -> None:
    """An alias that announces its own lifecycle must not outlive a target: its callers see its headers, not the
    target's, and would meet the target's sunset unannounced."""
    if not alias.lifecycle.announced:
        return  # its callers see the serving target's headers
    for target in alias.targets:
        target_sunset = models[target.model].lifecycle.sunset
        alias_sunset = alias.lifecycle.sunset
        if target_sunset is not None and (alias_sunset is None or alias_sunset > target_sunset):
            raise RegistryError(
                f"alias {alias.id!r} announces its own deprecation but its target {target.model!r} sunsets earlier,"
                f" on {target_sunset.isoformat()}: give the alias a sunset no later than that, or repoint it"
            )


def parse_aliases(raw: Any, models: Sequence[ModelSpec]) -> list[AliasSpec]:
    """The ``[[aliases]]`` tables, checked against the registry's models."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RegistryError("aliases must be an array of tables ([[aliases]])")
    by_id = {spec.id: spec for spec in models}
    aliases = [_alias(entry, f"aliases[{i}]", by_id) for i, entry in enumerate(raw)]
    ids = [alias.id for alias in aliases]
    if len(set(ids)) != len(ids):
        raise RegistryError(f"alias ids must be unique; got {ids}")
    for alias in aliases:
        _check_announcement(alias, by_id)
    return aliases
