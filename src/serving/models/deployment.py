"""Ray Serve deployments: one application per model, each a deployment whose replicas run a runner.

Embed and classify replicas batch across callers with ``@serve.batch`` (each call already carries a
gateway micro-batch); generation replicas run the streaming engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.domain import Task
from serving.models.classify import ZeroShotRunner
from serving.models.embed import EmbedRunner
from serving.models.engine import EngineLimits, GenerationEngine
from serving.models.generate import GenerateRunner
from serving.models.noop import NoopRunner
from serving.models.registry import ModelSpec
from serving.models.runner import Runner, run_batch
from serving.models.sequence import GenerateItem, GenerateOutput, TextChunk
from serving.models.sources import resolve_model_dir
from serving.models.stats import BatchStats, GenerationStats


def _setup(spec: ModelSpec, cache_dir: str, runner: Any) -> None:
    torch.set_num_threads(spec.replicas.torch_threads)
    runner.setup(resolve_model_dir(spec, Path(cache_dir)), spec.device, spec.dtype)


class BatchedModel:
    """Embed / classify replica."""

    def __init__(self, spec: ModelSpec, cache_dir: str) -> None:
        self.spec = spec
        self.runner: Runner
        if spec.runner == "noop":
            self.runner = NoopRunner()
        elif spec.task is Task.EMBED:
            self.runner = EmbedRunner(spec.max_input_tokens)
        else:
            self.runner = ZeroShotRunner(spec.max_input_tokens, spec.hypothesis)
        _setup(spec, cache_dir, self.runner)
        self.stats = BatchStats()
        batched: Any = self.infer  # @serve.batch adds these setters; the registry sets the values
        batched.set_max_batch_size(spec.batching.max_batch_size)
        batched.set_batch_wait_timeout_s(spec.batching.max_wait_ms / 1000)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def infer(self, calls: list[list[Any]]) -> list[list[Any]]:
        items = [item for call in calls for item in call]
        self.stats.record(len(items))
        # Inline on the replica's loop: measured faster than a worker thread (batches stayed at 3-4 items
        # with asyncio.to_thread under load, ~16 inline; see BENCHMARKS.md). Batches take milliseconds.
        outputs = run_batch(self.runner, items, self.spec.batching.max_batch_size)
        results: list[Any] = []
        start = 0
        for call in calls:
            part = outputs[start : start + len(call)]
            # Vectors cross back as one float32 array per call: far cheaper to serialize than float lists.
            results.append(np.stack(part) if part and isinstance(part[0], np.ndarray) else part)
            start += len(call)
        return results

    def batch_stats(self) -> dict[str, object]:
        return self.stats.snapshot()


class GenerateModel:
    """Generation replica (continuous batching): streams text chunks, then one GenerateOutput."""

    def __init__(self, spec: ModelSpec, cache_dir: str) -> None:
        self.runner = GenerateRunner(spec.batching.prefix_cache_mb)
        _setup(spec, cache_dir, self.runner)
        self.stats = GenerationStats()
        batching = spec.batching
        limits = EngineLimits(batching.max_batch_size, batching.max_waiting, batching.max_prefill_tokens)
        self.engine = GenerationEngine(self.runner, limits, self.stats)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def generate(self, item: GenerateItem) -> AsyncIterator[TextChunk | GenerateOutput]:
        async for event in self.engine.stream(item):
            yield event

    def batch_stats(self) -> dict[str, object]:
        cache = self.runner.prefix_cache.stats
        return {
            **self.stats.snapshot(),
            "replica": self.replica_id,
            "running": self.engine.running,
            "waiting": self.engine.waiting,
            "prefix_cache": {**vars(cache)},
        }


def build_application(spec: ModelSpec, cache_dir: Path) -> serve.Application:
    cls = GenerateModel if spec.task is Task.GENERATE else BatchedModel
    replicas = spec.replicas
    options: dict[str, Any] = {
        "name": spec.id,
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        # Embed/classify calls are whole micro-batches; generation calls are one stream each.
        "max_ongoing_requests": 256,
        "health_check_period_s": 5,
        # The gateway logs one access line per request (and polls batch_stats every few seconds): no replica-side
        # access log on top of it.
        "logging_config": {"enable_access_log": False},
    }
    if replicas.min_replicas is not None and replicas.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": replicas.min_replicas,
            "max_replicas": replicas.max_replicas,
            "target_ongoing_requests": spec.batching.max_batch_size,
        }
    else:
        options["num_replicas"] = replicas.num_replicas
    deployment: Any = serve.deployment(cls)
    application: serve.Application = deployment.options(**options).bind(spec, str(cache_dir))
    return application


def deploy_models(
    specs: list[ModelSpec], cache_dir: Path, app_prefix: str, progress: Callable[[str], None] | None = None
) -> dict[str, DeploymentHandle[Any]]:
    """Deploys every model (one Serve application each) and waits until all are running; ``progress`` hears each
    model become ready (and, every ``_PROGRESS_EVERY_S``, which are still deploying)."""
    targets = [
        serve.RunTarget(build_application(spec, cache_dir), name=f"{app_prefix}-{spec.id}", route_prefix=None)
        for spec in specs
    ]
    handles = serve.run_many(targets, wait_for_applications_running=progress is None)
    if progress is not None:
        _wait_running({f"{app_prefix}-{spec.id}": spec.id for spec in specs}, progress)
    return {spec.id: handle for spec, handle in zip(specs, handles, strict=True)}


_PROGRESS_EVERY_S = 15.0


def _wait_running(apps: dict[str, str], progress: Callable[[str], None]) -> None:
    """Polls the Serve controller until every application runs; a failed deployment raises with Serve's message."""
    started = last_note = time.monotonic()
    waiting = dict(apps)
    while waiting:
        statuses = serve.status().applications
        for app, model in list(waiting.items()):
            status = statuses.get(app)
            if status is not None and status.status == "RUNNING":
                progress(f"  {model} ready ({time.monotonic() - started:.0f} s)")
                del waiting[app]
            elif status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"model {model} failed to deploy: {status.message}")
        if waiting and time.monotonic() - last_note >= _PROGRESS_EVERY_S:
            last_note = time.monotonic()
            progress(f"  still deploying: {', '.join(waiting.values())} ({last_note - started:.0f} s)")
        if waiting:
            time.sleep(0.5)


def attach_models(specs: list[ModelSpec], app_prefix: str) -> dict[str, DeploymentHandle[Any]]:
    """Handles to models another process deployed (a gateway-only process)."""
    return {spec.id: serve.get_app_handle(f"{app_prefix}-{spec.id}") for spec in specs}


# Replica states in which a replica exists and answers calls: RECOVERING is a live replica a restarted Serve
# controller re-attaches to (after a head restart under GCS fault tolerance), UPDATING and PENDING_MIGRATION ones
# keep serving while they are reconfigured or moved. A replica that turns out dead fails its calls with
# UNAVAILABLE and leaves these states at the next poll.
SERVING_REPLICA_STATES = frozenset({"RUNNING", "RECOVERING", "UPDATING", "PENDING_MIGRATION"})


def can_serve(replica_states: Mapping[Any, int]) -> bool:
    return any(
        str(getattr(state, "value", state)) in SERVING_REPLICA_STATES and count > 0
        for state, count in replica_states.items()
    )


def models_state(app_names: list[str]) -> tuple[bool, frozenset[str]]:
    """Whether every model can serve now, and which applications have a replica that answers (one question to the
    Serve controller). The application's own status is not used: an application serves while it is DEPLOYING (an
    update rolls its replicas; a restarted controller recovers them), and cannot while RUNNING is stale (its node
    just died)."""
    applications = serve.status().applications
    serving = frozenset(
        name
        for name in app_names
        if name in applications and any(can_serve(d.replica_states) for d in applications[name].deployments.values())
    )
    return all(name in serving for name in app_names), serving
