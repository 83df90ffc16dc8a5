"""The names partners call → the concrete model that serves each call.

A name is a model id (``minilm-l6``, or a version ``minilm-l6@2026-11``) or an alias from the registry's
``[[aliases]]``. An alias picks one of its targets by weight, sticky per request id: the same request id (an
idempotency key, or the id the gateway generated) always lands on the same version, so a retry meets the version
the first attempt met. Responses name the concrete model; the ledger and the metrics record it.

What a response announces (``Deprecation`` / ``Sunset``) is the lifecycle of the name called; through an alias that
announces nothing of its own, that of the model serving the call (so a partner is warned before any sunset it can
meet). After a sunset, calls are refused (``ModelRetired``: FAILED_PRECONDITION / 410) whichever name reached it.

Plans: a model called by its id must be in the plan's ``allowed_models``; an alias is allowed when the plan lists
the alias, or every model it may route to (so whether a call is allowed never depends on the version it draws).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from serving.domain import ModelInfo, Task
from serving.errors import InvalidInput, ModelNotFound, ModelRetired
from serving.models.aliases import AliasSpec
from serving.models.lifecycle import Lifecycle, RegistryError, split_version
from serving.models.registry import ModelSpec
from serving.plans import Plan

_POINTS = 1 << 64  # a request id hashes to one of this many points, spread over an alias's weights


@dataclass(frozen=True)
class Resolved:
    """One call's model: the name called, the concrete model serving it, and the lifecycles that matter."""

    name: str
    model: str
    name_lifecycle: Lifecycle
    model_lifecycle: Lifecycle

    @property
    def announced(self) -> Lifecycle:
        """What the response's headers / metadata announce."""
        return self.name_lifecycle if self.name_lifecycle.announced else self.model_lifecycle


def sticky_point(alias: str, request_id: str) -> int:
    """A stable, uniform point in [0, 2**64) for a request id (per alias: two aliases split independently)."""
    digest = hashlib.sha256(f"{alias}\n{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pick(alias: AliasSpec, request_id: str) -> str:
    """The target serving ``request_id``: weight w of a total W gets w / W of the points."""
    total = sum(target.weight for target in alias.targets)
    slot = sticky_point(alias.id, request_id) * total // _POINTS  # 0 .. total - 1, exactly proportional
    for target in alias.targets:
        if slot < target.weight:
            return target.model
        slot -= target.weight
    raise AssertionError("unreachable: the slot is below the total weight")


class Catalog:
    """Resolves names, checks plans and sunsets, and lists models and aliases. ``clock``: Unix seconds now (the
    sunset check's only time source; tests fix it)."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        aliases: Sequence[AliasSpec] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._models = {spec.id: spec for spec in specs}
        self._aliases = {alias.id: alias for alias in aliases}
        self._clock = clock
        for alias in aliases:  # the registry checked this against its own models; the gateway may serve fewer
            missing = [t.model for t in alias.targets if t.model not in self._models]
            if missing:
                raise RegistryError(f"alias {alias.id!r} routes to {missing}, which this gateway does not serve")
            if alias.id in self._models:
                raise RegistryError(f"alias {alias.id!r} has the id of a model")

    def resolve(self, name: str, request_id: str, task: Task) -> Resolved:
        """The concrete model for a call of ``name`` with ``request_id`` (the generated one when the caller sent
        none). Raises for a missing, unknown or wrong-task name."""
        if not name:
            raise InvalidInput("model is required", param="model")
        alias = self._aliases.get(name)
        model = pick(alias, request_id) if alias is not None else name
        spec = self._models.get(model)
        if spec is None:
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the models", param="model")
        if spec.task is not task:
            raise InvalidInput(f"model {name!r} is a {spec.task.value} model, not a {task.value} model", param="model")
        own = alias.lifecycle if alias is not None else spec.lifecycle
        return Resolved(name, model, own, spec.lifecycle)

    def refuse_retired(self, resolved: Resolved) -> None:
        """Raises ``ModelRetired`` when the name called, or the model serving it, is past its sunset."""
        now = self._clock()
        for entry, lifecycle in ((resolved.name, resolved.name_lifecycle), (resolved.model, resolved.model_lifecycle)):
            if lifecycle.retired(now):
                assert lifecycle.sunset is not None
                via = "" if entry == resolved.name else f" (alias {resolved.name!r} routes to it)"
                instead = (
                    f"; call {lifecycle.replacement!r} instead"
                    if lifecycle.replacement
                    else "; GET /v1/models lists the models"
                )
                raise ModelRetired(
                    f"model {entry!r}{via} was retired at its sunset, {lifecycle.sunset.isoformat()}{instead}",
                    replacement=lifecycle.replacement,
                )

    def allows(self, plan: Plan, name: str) -> bool:
        """Whether ``plan`` may call ``name``: the name itself is allowed, or (an alias) every model it routes to."""
        if plan.allows_model(name):
            return True
        alias = self._aliases.get(name)
        return alias is not None and all(plan.allows_model(t.model) for t in alias.targets)

    def describe(self, dimensions: Mapping[str, int]) -> list[ModelInfo]:
        """Every model (versions included), then every alias, with lifecycles; ``dimensions`` per model id."""
        infos = [self._info(spec.id, spec.task, dimensions.get(spec.id, 0), spec, ()) for spec in self._models.values()]
        for alias in self._aliases.values():
            specs = [self._models[t.model] for t in alias.targets]
            widths = {dimensions.get(spec.id, 0) for spec in specs}
            targets = tuple((t.model, t.weight) for t in alias.targets)
            infos.append(self._info(alias.id, specs[0].task, widths.pop() if len(widths) == 1 else 0, alias, targets))
        return infos

    def _info(
        self, entry_id: str, task: Task, dims: int, entry: ModelSpec | AliasSpec, targets: tuple[tuple[str, int], ...]
    ) -> ModelInfo:
        if isinstance(entry, AliasSpec):
            max_input = min(self._models[t.model].max_input_tokens for t in entry.targets)
        else:
            max_input = entry.max_input_tokens
        lifecycle = entry.lifecycle
        return ModelInfo(
            id=entry_id,
            task=task,
            dimensions=dims,
            max_input_tokens=max_input,
            ready=not lifecycle.retired(self._clock()),
            version=split_version(entry_id)[1],
            targets=targets,
            deprecated=lifecycle.deprecated,
            sunset=lifecycle.sunset,
            replacement=lifecycle.replacement or "",
        )
