"""The one request path: authenticate → validate → (admit) → route → settle → record → respond.

Both front doors call this and nothing else; every request ends in exactly one metrics observation,
made in a ``finally`` from the request's final status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from serving.domain import (
    Caller,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Task,
    TextDelta,
    Usage,
)
from serving.errors import DeadlineExceeded, ServingError, describe
from serving.gateway import validation
from serving.gateway.router import ModelRoute, Router
from serving.models.generate import GenerateItem, GenerateOutput
from serving.observability.metrics import Metrics
from serving.partners.auth import Authenticator
from serving.settings import Limits

log = logging.getLogger("serving.gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class CallContext:
    """What a front door knows about a call besides its body."""

    api_key: str | None
    timeout_s: float | None = None


@dataclass
class _Call:
    """One request's bookkeeping; observed once when it ends."""

    operation: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    usage: Usage = field(default_factory=Usage)
    status: str = "ok"


class Core:
    def __init__(self, authenticator: Authenticator, router: Router, limits: Limits, metrics: Metrics) -> None:
        self._auth = authenticator
        self._router = router
        self._limits = limits
        self._metrics = metrics

    # --- the operations -------------------------------------------------------------------------------

    async def embed(self, ctx: CallContext, req: EmbedRequest) -> EmbedResult:
        call = self._begin("embed", req.model)
        try:
            call.caller = self._auth.authenticate(ctx.api_key)
            request_id = validation.request_id(req.request_id)
            route = self._router.route(req.model, Task.EMBED)
            tokens = validation.texts(req.texts, self._limits, route.codec, route.spec)
            vectors = await self._bounded(route.infer(list(req.texts)), ctx)
            call.usage = Usage(input_tokens=tokens)
            return EmbedResult(model=req.model, embeddings=vectors, usage=call.usage, request_id=request_id)
        except BaseException as exc:
            call.status = _status(exc)
            raise
        finally:
            self._observe(call)

    async def classify(self, ctx: CallContext, req: ClassifyRequest) -> ClassifyResult:
        call = self._begin("classify", req.model)
        try:
            call.caller = self._auth.authenticate(ctx.api_key)
            request_id = validation.request_id(req.request_id)
            route = self._router.route(req.model, Task.CLASSIFY)
            tokens = validation.texts(req.texts, self._limits, route.codec, route.spec)
            labels = validation.labels(req.labels, route.spec, self._limits)
            results = await self._bounded(route.infer([(text, labels) for text in req.texts]), ctx)
            call.usage = Usage(input_tokens=tokens)
            return ClassifyResult(model=req.model, results=results, usage=call.usage, request_id=request_id)
        except BaseException as exc:
            call.status = _status(exc)
            raise
        finally:
            self._observe(call)

    async def generate(self, ctx: CallContext, req: GenerateRequest) -> GenerateResult:
        # The same path as streaming, so that temperature-0 output is identical either way.
        text: list[str] = []
        final: GenerateResult | None = None
        async for event in await self.generate_stream(ctx, req):
            if isinstance(event, TextDelta):
                text.append(event.text)
            else:
                final = event
        if final is None:
            raise AssertionError("a generation stream ended without its final event")
        return GenerateResult(final.model, "".join(text), final.finish_reason, final.usage, final.request_id)

    async def generate_stream(self, ctx: CallContext, req: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Authenticates and validates now (errors raise before any event); then streams."""
        call = self._begin("generate", req.model)
        try:
            call.caller = self._auth.authenticate(ctx.api_key)
            request_id = validation.request_id(req.request_id)
            route = self._router.route(req.model, Task.GENERATE)
            params = validation.sampling(req, self._limits)
            prompt = validation.prompt_ids(req, route.codec, route.spec, self._limits)
        except BaseException as exc:
            call.status = _status(exc)
            self._observe(call)
            raise
        item = GenerateItem(prompt_ids=prompt, params=params)
        return self._stream(call, ctx, route, item, request_id)

    async def _stream(
        self, call: _Call, ctx: CallContext, route: ModelRoute, item: GenerateItem, request_id: str
    ) -> AsyncIterator[StreamEvent]:
        sent: list[str] = []
        finished = False
        deadline = None if ctx.timeout_s is None else asyncio.get_running_loop().time() + ctx.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                async for event in route.generate(item):
                    if isinstance(event, GenerateOutput):
                        call.usage = Usage(len(item.prompt_ids), event.output_tokens)
                        finished = True
                        yield GenerateResult(call.model, event.text, event.finish_reason, call.usage, request_id)
                        return
                    sent.append(event)
                    yield TextDelta(event)
        except BaseException as exc:
            if finished:  # the final event was delivered; closing the stream afterwards changes nothing
                raise
            call.status = _status(exc)
            # Billed for what the client was sent.
            call.usage = Usage(len(item.prompt_ids), sum(route.codec.count(["".join(sent)])) if sent else 0)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("the request exceeded its deadline") from exc
            raise
        finally:
            self._observe(call)

    async def list_models(self, ctx: CallContext) -> list[ModelInfo]:
        self._auth.authenticate(ctx.api_key)
        return self.models()

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=route.spec.id,
                task=route.spec.task,
                dimensions=route.dimensions,
                max_input_tokens=route.spec.max_input_tokens,
                ready=True,
            )
            for route in self._router.routes.values()
        ]

    # --- shared steps ---------------------------------------------------------------------------------

    async def _bounded(self, work: Awaitable[T], ctx: CallContext) -> T:
        try:
            async with asyncio.timeout(ctx.timeout_s):
                return await work
        except TimeoutError as exc:
            raise DeadlineExceeded("the request exceeded its deadline") from exc

    def _begin(self, operation: str, model: str) -> _Call:
        self._metrics.in_flight.labels(operation).inc()
        return _Call(operation, model)

    def _observe(self, call: _Call) -> None:
        self._metrics.in_flight.labels(call.operation).dec()
        elapsed = time.perf_counter() - call.started
        self._metrics.requests.labels(call.model, call.operation, call.status).inc()
        self._metrics.latency.labels(call.model, call.operation).observe(elapsed)
        if call.caller is not None:
            partner = call.caller.partner_id
            self._metrics.partner_requests.labels(partner, call.model, call.operation, call.status).inc()
            self._metrics.partner_tokens.labels(partner, call.model, "input").inc(call.usage.input_tokens)
            self._metrics.partner_tokens.labels(partner, call.model, "output").inc(call.usage.output_tokens)
        if call.status == "internal":
            log.error("request failed: model=%s op=%s", call.model, call.operation)


def _status(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    if isinstance(exc, TimeoutError):
        return "deadline_exceeded"
    if not isinstance(exc, ServingError):
        log.exception("unexpected error", exc_info=exc)
    return describe(exc).grpc_code.lower()
