"""The gate's one config file (``loadtests/gate.toml``): load shape, partners and plans, request mix, and
the release thresholds. Parsed once into frozen dataclasses; unknown keys are errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "gate.toml"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Load:
    users: int = 10
    spawn_rate: float = 2.0  # users started per second (the ramp)
    run_time_s: int = 60
    stop_timeout_s: int = 30  # users finish the request in hand before locust stops
    wait_min_s: float = 0.2  # think time between a user's requests
    wait_max_s: float = 1.0
    grpc_weight: int = 3  # gRPC users : HTTP users
    http_weight: int = 2


@dataclass(frozen=True)
class PlanSpec:
    """A plan the gate creates (``PUT /admin/v1/plans/{name}``) before its partners use it."""

    name: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    monthly_tokens: int = 0
    allowed_models: list[str] = field(default_factory=list)
    weight: float = 1.0

    def body(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


@dataclass(frozen=True)
class PartnerSpec:
    """``share`` of the users act for this partner. ``expect_429``: its plan's limits are meant to be hit, so
    its 429s are counted apart; any other partner's 429 is an error."""

    name: str
    plan: str
    share: float = 1.0
    expect_429: bool = False


@dataclass(frozen=True)
class Mix:
    """Relative weights of each user's operations, and the generation budget per request."""

    grpc: dict[str, float]
    http: dict[str, float]
    max_tokens: int = 24


GRPC_OPS = ("embed", "classify", "generate", "generate_stream")
HTTP_OPS = ("embed", "classify", "openai_embeddings", "openai_chat", "openai_chat_stream")


@dataclass(frozen=True)
class Thresholds:
    """``p99_ms`` maps locust entry names (``grpc embed``, ``http openai_chat_stream [ttft]`` ...) to their
    p99 ceiling; a listed entry without samples fails. Error rate excludes expected 429s."""

    p99_ms: dict[str, float]
    max_error_rate: float = 0.01
    min_throughput_rps: float = 1.0  # successful requests per second over the run
    max_unmetered: int = 0
    max_double_metered: int = 0
    max_token_mismatches: int = 0


@dataclass(frozen=True)
class GateConfig:
    load: Load
    plans: list[PlanSpec]
    partners: list[PartnerSpec]
    mix: Mix
    thresholds: Thresholds


def _build(cls: Any, raw: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    if unknown := set(raw) - known:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_config(raw: dict[str, Any]) -> GateConfig:
    if unknown := set(raw) - {"load", "plans", "partners", "mix", "thresholds"}:
        raise ConfigError(f"unknown sections {sorted(unknown)}")
    mix_raw = dict(raw.get("mix", {}))
    mix = _build(Mix, {"grpc": {}, "http": {}, **mix_raw}, "[mix]")
    for kind, ops, weights in (("grpc", GRPC_OPS, mix.grpc), ("http", HTTP_OPS, mix.http)):
        if bad := set(weights) - set(ops):
            raise ConfigError(f"[mix.{kind}]: unknown operations {sorted(bad)}; known: {list(ops)}")
    config = GateConfig(
        load=_build(Load, raw.get("load", {}), "[load]"),
        plans=[_build(PlanSpec, p, "[[plans]]") for p in raw.get("plans", [])],
        partners=[_build(PartnerSpec, p, "[[partners]]") for p in raw.get("partners", [])],
        mix=mix,
        thresholds=_build(Thresholds, {"p99_ms": {}, **raw.get("thresholds", {})}, "[thresholds]"),
    )
    if not config.partners:
        raise ConfigError("at least one [[partners]] entry is needed")
    if not any(config.mix.grpc.values()) and not any(config.mix.http.values()):
        raise ConfigError("[mix]: every operation weight is zero")
    return config


def load_config(path: Path = DEFAULT_CONFIG) -> GateConfig:
    with path.open("rb") as f:
        return parse_config(tomllib.load(f))
