"""Model id → its Ray Serve deployment. The only gateway module that talks to Ray.

Embed and classify requests cross the Ray boundary in micro-batches; a generation request is one stream
(its compute, hundreds of milliseconds, dwarfs the hop; the replica batches streams itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span, SpanContext
from ray import exceptions as ray_exceptions
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.domain import Task
from serving.errors import InvalidInput, ModelNotFound, Overloaded, ServingError, Unavailable
from serving.gateway.microbatch import MicroBatcher
from serving.models.codec import TextCodec
from serving.models.registry import ModelSpec
from serving.models.sequence import GenerateItem, GenerateOutput, TextChunk
from serving.observability.metrics import Metrics
from serving.observability.tracing import Tracing
from serving.settings import Batching


def translate_ray_error(exc: Exception) -> Exception:
    """Ray failures → domain errors; a failure inside model code stays a bug (INTERNAL)."""
    if isinstance(exc, BackPressureError):
        return Overloaded("the model is at capacity; retry shortly", retry_after_s=1.0)
    if isinstance(exc, ray_exceptions.RayTaskError):
        # A domain error raised by the replica (its waiting queue is full) keeps its meaning.
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, ServingError) else exc
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
    metrics: Metrics | None = None
    max_batch_size: int = 1
    tracing: Tracing = field(default_factory=Tracing.disabled)
    # Set while the model has no running replica (the gateway polls the Serve controller): a call then fails at
    # once with UNAVAILABLE instead of waiting in Serve's queue for a replica that may be minutes away.
    no_replicas: asyncio.Event = field(default_factory=asyncio.Event)
    _in_flight: set[Any] = field(default_factory=set)  # handle calls awaiting a replica or its answer

    def _refuse_without_replicas(self) -> None:
        if self.no_replicas.is_set():
            raise Unavailable(
                f"model {self.spec.id} has no running replica right now (it is being restarted); retry shortly",
                retry_after_s=1.0,
            )

    async def _while_serving(self, response: Any) -> Any:
        """Awaits a handle call (a DeploymentResponse) that ``lose_replicas`` cancels if the model loses its last
        replica first: it then leaves Serve's queue and this raises UNAVAILABLE. No task per call: the hot path
        pays one set insert and removal."""
        self._in_flight.add(response)
        try:
            return await response
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if response.cancelled() and task is not None and not task.cancelling():  # ours, not the caller's
                self._refuse_without_replicas()
            raise
        finally:
            self._in_flight.discard(response)

    def lose_replicas(self) -> None:
        """The model has no running replica: calls fail fast from now on, and those waiting are cancelled."""
        self.no_replicas.set()
        for response in list(self._in_flight):
            response.cancel()

    async def _call_batch(self, items: list[Any], links: Sequence[SpanContext] = ()) -> list[Any]:
        started = time.perf_counter()
        span = self.tracing.start_batch(self.spec.id, len(items), links)
        try:
            self._refuse_without_replicas()
            return await self._while_serving(self.handle.infer.remote(items))  # type: ignore[no-any-return]
        except Exception as exc:
            span.record_exception(exc)
            raise translate_ray_error(exc) from exc
        finally:
            span.end()
            if self.metrics is not None:
                self.metrics.observe_batch(self.spec.id, len(items), self.max_batch_size, time.perf_counter() - started)

    async def infer(self, items: list[Any], parent: Span | None = None) -> list[Any]:
        """``parent``: the request's span; the Ray hop is its child, linked from the batch span."""
        assert self.batcher is not None
        with self.tracing.stage("ray.infer", parent) as hop:
            try:
                outputs: Any = await self.batcher.submit(items, hop.get_span_context())
            except Overloaded:  # the replicas refused the batch: counted once per request
                if self.metrics is not None:
                    self.metrics.shed.labels(self.spec.id, "backpressure").inc()
                raise
        rows: list[Any] = outputs.tolist() if hasattr(outputs, "tolist") else outputs  # float32 rows → float lists
        return rows

    async def generate(self, item: GenerateItem) -> AsyncIterator[TextChunk | GenerateOutput]:
        self._refuse_without_replicas()
        stream: Any = self.handle.options(stream=True).generate.remote(item)
        finished = False
        try:
            async for event in stream:
                finished = isinstance(event, GenerateOutput)
                yield event
        except Exception as exc:
            error = translate_ray_error(exc)
            if isinstance(error, Overloaded) and self.metrics is not None:  # the replica's waiting queue is full
                self.metrics.shed.labels(self.spec.id, "backpressure").inc()
            raise error from exc
        finally:
            if not finished:
                stream.cancel()  # frees the sequence's slot in the replica's batch

    async def batch_stats(self) -> dict[str, Any]:
        return await self.handle.batch_stats.remote()  # type: ignore[no-any-return]


class Router:
    def __init__(
        self,
        routes: dict[str, ModelRoute],
        batching: Batching,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        grpc_transport: bool = True,
        router_on_loop: bool = True,
    ) -> None:
        self.routes = routes
        self._own: list[DeploymentHandle[Any]] = []  # handles whose Serve router runs on this loop: closed by us
        if metrics is not None:
            metrics.init_models(list(routes))
        for route in routes.values():
            if router_on_loop and _loop_running():
                # A handle of our own whose Serve router (replica choice, queue-length probes) runs on the
                # gateway's event loop, not on Serve's router thread: no GIL hand-off per call, a third less CPU
                # per request on this path (decision 0010).
                own: DeploymentHandle[Any] = DeploymentHandle(route.handle.deployment_name, route.handle.app_name)
                own._init(_run_router_in_separate_loop=False)  # type: ignore[no-untyped-call]
                self._own.append(own)
                route.handle = own
            if grpc_transport:
                # Serve's gRPC transport to the replicas instead of Ray actor calls: half the gateway's CPU per
                # handle call and ~1.5 ms less latency, with Serve's routing kept (decision 0010).
                # Plain pickle both ways: what crosses is lists of texts, arrays and dataclasses of this package,
                # which need none of cloudpickle's by-value code capture (its per-call module scan shows in profiles).
                route.handle = route.handle.options(
                    _by_reference=False, request_serialization="pickle", response_serialization="pickle"
                )
            route.metrics = metrics
            route.max_batch_size = batching.max_batch_size
            route.tracing = tracing or Tracing.disabled()
            if route.spec.task is not Task.GENERATE:
                route.batcher = MicroBatcher(
                    route._call_batch,
                    batching.max_batch_size,
                    batching.max_wait_ms / 1000,
                    batching.max_inflight,
                    send_linked=route._call_batch,
                )

    async def close(self) -> None:
        """Stops the Serve routers running on this loop (before the loop itself stops)."""
        for handle in self._own:
            await handle.shutdown_async()  # type: ignore[no-untyped-call]
        self._own.clear()

    def set_serving(self, model: str, serving: bool) -> None:
        """Whether ``model`` has a running replica (from the gateway's poll of the Serve controller)."""
        route = self.routes.get(model)
        if route is not None:
            if serving:
                route.no_replicas.clear()
            elif not route.no_replicas.is_set():
                route.lose_replicas()

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


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def replica_counts(app_names: dict[str, str]) -> dict[str, dict[str, int]]:
    """Model id → replica state (lower case) → replicas, from the Serve controller; ``app_names`` maps each model
    id to its Serve application name. A model whose application is missing counts no replicas."""
    applications = serve.status().applications
    counts: dict[str, dict[str, int]] = {}
    for model, app_name in app_names.items():
        states: dict[str, int] = {}
        app = applications.get(app_name)
        for deployment in app.deployments.values() if app is not None else ():
            for state, replicas in deployment.replica_states.items():
                key = str(getattr(state, "value", state)).lower()
                states[key] = states.get(key, 0) + replicas
        counts[model] = states
    return counts
