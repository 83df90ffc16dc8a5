"""Option C: plain Ray Serve as its docs show. One ``@serve.batch`` deployment runs the no-op or MiniLM
inline, called once per request, either through a DeploymentHandle by closed-loop callers in the driver
(``PlainBatched``, rows C-i / C-ii), or over HTTP through Serve's own proxy exactly as Serve's batching guide
shows (``PlainHttp``: ``__call__(request)`` awaits a ``@serve.batch`` method; rows C-http-*), loaded by an
HTTP client in a separate process.

``PlainBatched`` lives in this module, so Ray pickles it by reference (``benchlib.plain.PlainBatched``) and
the replica must be able to import ``benchlib``: the deployment's runtime_env puts ``loadtests/`` on the
replica's PYTHONPATH (see ``replica_runtime_env``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve
from starlette.requests import Request

from benchlib.common import APP_PREFIX, LOADTESTS, SENTENCES, Config, Measurement, drive, measurement

if TYPE_CHECKING:
    from serving.models.embed import EmbedRunner
    from serving.models.noop import NoopRunner

PLAIN_MAX_BATCH = 64
PLAIN_WAIT_S = 0.005


class PlainBatched:
    """One deployment, ``@serve.batch``, the model called inline; one handle call per request."""

    def __init__(self, model_dir: str, noop: bool, device: str = "cpu", dtype: str = "float32") -> None:
        self.runner = make_runner(model_dir, noop, device, dtype)
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=PLAIN_MAX_BATCH, batch_wait_timeout_s=PLAIN_WAIT_S)
    async def __call__(self, texts: list[str]) -> list[Any]:
        self.batches += 1
        self.items += len(texts)
        return self.runner.predict(texts)

    def batch_stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items}


class PlainHttp:
    """Serve's batching guide, verbatim in shape: an HTTP ingress whose ``__call__`` awaits a batched method.
    The body is ``{"text": "..."}``; the answer is the vector as a JSON list."""

    def __init__(self, model_dir: str, noop: bool, device: str = "cpu", dtype: str = "float32") -> None:
        self.runner = make_runner(model_dir, noop, device, dtype)
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=PLAIN_MAX_BATCH, batch_wait_timeout_s=PLAIN_WAIT_S)
    async def handle_batch(self, texts: list[str]) -> list[list[float]]:
        self.batches += 1
        self.items += len(texts)
        return [[float(x) for x in vector] for vector in self.runner.predict(texts)]

    async def __call__(self, request: Request) -> list[float]:
        body = await request.json()
        vector: list[float] = await self.handle_batch(body["text"])
        return vector

    def batch_stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items}


def make_runner(model_dir: str, noop: bool, device: str, dtype: str) -> EmbedRunner | NoopRunner:
    """The no-op or MiniLM runner, one torch thread (what a stack replica gets)."""
    import torch

    from serving.models.embed import EmbedRunner
    from serving.models.noop import NoopRunner

    torch.set_num_threads(1)
    runner: EmbedRunner | NoopRunner = NoopRunner() if noop else EmbedRunner(max_input_tokens=256)
    runner.setup(Path(model_dir), device, dtype)
    return runner


def replica_runtime_env() -> dict[str, Any]:
    """``loadtests/`` first on the replica's import path, so it can import ``benchlib.plain``."""
    path = os.pathsep.join(p for p in (str(LOADTESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


@dataclass(frozen=True)
class PlainPlacement:
    """Where a plain-Serve replica runs: its Ray resources and the runner's device and dtype."""

    num_cpus: float
    num_gpus: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"


def deploy_plain(name: str, model_dir: Path, noop: bool, placement: PlainPlacement, http: bool = False) -> Any:
    """The handle deployment, or with ``http`` the HTTP ingress at route ``/<name>`` on Serve's proxy."""
    app = (
        serve.deployment(PlainHttp if http else PlainBatched)
        .options(  # type: ignore[attr-defined]
            name=name,
            ray_actor_options={
                "num_cpus": placement.num_cpus,
                "num_gpus": placement.num_gpus,
                "runtime_env": replica_runtime_env(),
            },
            # Serve's default (5) would cap every batch at 5; its batching guide says to raise it.
            max_ongoing_requests=2 * PLAIN_MAX_BATCH,
        )
        .bind(str(model_dir), noop, placement.device, placement.dtype)
    )
    return serve.run(app, name=f"{APP_PREFIX}-{name}", route_prefix=f"/{name}" if http else None)


async def plain_run(key: str, label: str, handle: Any, cfg: Config) -> Measurement:
    """``cfg.concurrency`` closed-loop callers in the driver, one handle call per request."""

    async def call(index: int) -> None:
        await handle.remote(SENTENCES[index % len(SENTENCES)])

    stats = await drive(call, cfg.concurrency, cfg.warmup_s, cfg.duration_s)
    return measurement(key, label, "req/s", stats)
