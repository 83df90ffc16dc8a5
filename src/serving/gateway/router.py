"""Model id → its Ray Serve deployment. The only gateway module that talks to Ray.

Embed and classify requests cross the Ray boundary in micro-batches; a generation request is one stream
(its compute, hundreds of milliseconds, dwarfs the hop; the replica batches streams itself).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.domain import Task
from serving.errors import InvalidInput, ModelNotFound, Overloaded, Unavailable
from serving.gateway.microbatch import MicroBatcher
from serving.models.codec import TextCodec
from serving.models.generate import GenerateItem, GenerateOutput
from serving.models.registry import ModelSpec
from serving.settings import Batching


def _translate(exc: Exception) -> Exception:
    """Ray failures → domain errors; a failure inside model code stays a bug (INTERNAL)."""
    if isinstance(exc, BackPressureError):
        return Overloaded("the model is at capacity; retry shortly", retry_after_s=1.0)
    if isinstance(exc, ray_exceptions.RayTaskError):
        return exc
    if isinstance(exc, ray_exceptions.RayError):
        return Unavailable(f"the model is unavailable ({type(exc).__name__}); retry shortly", retry_after_s=1.0)
    return exc


@dataclass
class ModelRoute:
    spec: ModelSpec
    codec: TextCodec
    handle: DeploymentHandle[Any]
    dimensions: int
    batcher: MicroBatcher[Any, Any] | None = None

    async def _call_batch(self, items: list[Any]) -> list[Any]:
        try:
            return await self.handle.infer.remote(items)  # type: ignore[no-any-return]
        except Exception as exc:
            raise _translate(exc) from exc

    async def infer(self, items: list[Any]) -> list[Any]:
        assert self.batcher is not None
        outputs: Any = await self.batcher.submit(items)
        rows: list[Any] = outputs.tolist() if hasattr(outputs, "tolist") else outputs  # float32 rows → float lists
        return rows

    async def generate(self, item: GenerateItem) -> AsyncIterator[str | GenerateOutput]:
        stream: Any = self.handle.options(stream=True).generate.remote(item)
        finished = False
        try:
            async for event in stream:
                finished = isinstance(event, GenerateOutput)
                yield event
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            if not finished:
                stream.cancel()  # frees the sequence's slot in the replica's batch

    async def batch_stats(self) -> dict[str, Any]:
        return await self.handle.batch_stats.remote()  # type: ignore[no-any-return]


class Router:
    def __init__(self, routes: dict[str, ModelRoute], batching: Batching) -> None:
        self.routes = routes
        for route in routes.values():
            if route.spec.task is not Task.GENERATE:
                route.batcher = MicroBatcher(
                    route._call_batch, batching.max_batch_size, batching.max_wait_ms / 1000, batching.max_inflight
                )

    def route(self, model: str, task: Task) -> ModelRoute:
        if not model:
            raise InvalidInput("model is required", param="model")
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"model {model!r} does not exist; GET /v1/models lists the models", param="model")
        if route.spec.task is not task:
            raise InvalidInput(
                f"model {model!r} is a {route.spec.task.value} model, not a {task.value} model", param="model"
            )
        return route
