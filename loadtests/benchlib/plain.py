"""Option C: plain Ray Serve as its docs show. One ``@serve.batch`` deployment runs the no-op or MiniLM
inline, called once per request through a DeploymentHandle by closed-loop callers in the driver.

``PlainBatched`` lives in this module, so Ray pickles it by reference (``benchlib.plain.PlainBatched``) and
the replica must be able to import ``benchlib``: the deployment's runtime_env puts ``loadtests/`` on the
replica's PYTHONPATH (see ``replica_runtime_env``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve

from benchlib.common import APP_PREFIX, LOADTESTS, SENTENCES, Config, Measurement, drive, measurement

PLAIN_MAX_BATCH = 64
PLAIN_WAIT_S = 0.005


class PlainBatched:
    """One deployment, ``@serve.batch``, the model called inline; one handle call per request."""

    def __init__(self, model_dir: str, noop: bool) -> None:
        import torch

        from serving.models.embed import EmbedRunner
        from serving.models.noop import NoopRunner

        torch.set_num_threads(1)
        self.runner: EmbedRunner | NoopRunner = NoopRunner() if noop else EmbedRunner(max_input_tokens=256)
        self.runner.setup(Path(model_dir), "cpu", "float32")
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=PLAIN_MAX_BATCH, batch_wait_timeout_s=PLAIN_WAIT_S)
    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.batches += 1
        self.items += len(texts)
        return self.runner.predict(texts)

    def batch_stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items}


def replica_runtime_env() -> dict[str, Any]:
    """``loadtests/`` first on the replica's import path, so it can import ``benchlib.plain``."""
    path = os.pathsep.join(p for p in (str(LOADTESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def deploy_plain(name: str, model_dir: Path, noop: bool, num_cpus: float) -> Any:
    app = (
        serve.deployment(PlainBatched)
        .options(  # type: ignore[attr-defined]
            name=name,
            ray_actor_options={"num_cpus": num_cpus, "runtime_env": replica_runtime_env()},
            # Serve's default (5) would cap every batch at 5; its batching guide says to raise it.
            max_ongoing_requests=2 * PLAIN_MAX_BATCH,
        )
        .bind(str(model_dir), noop)
    )
    return serve.run(app, name=f"{APP_PREFIX}-{name}", route_prefix=None)


async def plain_run(key: str, label: str, handle: Any, cfg: Config) -> Measurement:
    """``cfg.concurrency`` closed-loop callers in the driver, one handle call per request."""

    async def call(index: int) -> None:
        await handle.remote(SENTENCES[index % len(SENTENCES)])

    stats = await drive(call, cfg.concurrency, cfg.warmup_s, cfg.duration_s)
    return measurement(key, label, "req/s", stats)
