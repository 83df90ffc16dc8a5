"""The one request path: authenticate → validate → admit (quota, fair queue) → route → settle → record
→ respond. Both front doors call this and nothing else.

Every admitted request ends in exactly one usage record, written (journaled) before its response leaves,
and every request ends in exactly one metrics observation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

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
from serving.errors import (
    DeadlineExceeded,
    InsufficientScope,
    PermissionDenied,
    QuotaExceeded,
    RouteNotFound,
    ServingError,
    Unavailable,
)
from serving.gateway import validation
from serving.gateway.call import Call
from serving.gateway.catalog import Catalog
from serving.gateway.router import ModelRoute, Router
from serving.gateway.stream import EventStream, StreamPace, nothing_to_settle, replay_events
from serving.idempotency.codec import Outcome, expect_outcome, fingerprint
from serving.idempotency.keys import IdempotencyKeys
from serving.identity.scopes import USAGE_READ, format_scopes, scope_for
from serving.metering.record import UsageRecord
from serving.metering.usage import UsageReport, UsageRow
from serving.models.lifecycle import Lifecycle
from serving.models.sequence import GenerateItem, GenerateOutput
from serving.observability import access_log
from serving.observability.metrics import Metrics
from serving.observability.tracing import Tracing
from serving.partners.auth import Authenticator
from serving.quota.admission import Admission
from serving.quota.limiter import RateLimits
from serving.settings import Limits

access = logging.getLogger(access_log.ACCESS_LOGGER)
T = TypeVar("T")


class UsageSink(Protocol):
    def record(self, record: UsageRecord) -> None: ...


class UsageSource(Protocol):
    def __call__(self, partner_id: str, start_day: str, end_day: str) -> list[UsageRow]: ...


class CreditSource(Protocol):
    """The caller's credit grants and balance (``serving.commerce.prepaid.Prepaid.statement``)."""

    async def statement(self, caller: Caller) -> dict[str, Any]: ...


@dataclass
class ResponseMeta:
    """What the core tells a front door to send besides the body (headers / metadata), errors included."""

    request_id: str = ""
    rate_limits: RateLimits | None = None
    replayed: bool = False  # the outcome of an earlier request with the same idempotency key
    model: str = ""  # the concrete model serving the call (an alias resolved), once known
    lifecycle: Lifecycle | None = None  # the deprecation / sunset the response announces


@dataclass(frozen=True)
class CallContext:
    """What a front door knows about a call besides its body."""

    api_key: str | None
    timeout_s: float | None = None
    peer: str | None = None
    meta: ResponseMeta = field(default_factory=ResponseMeta)
    correlation_id: str | None = None  # the caller's x-request-id: logged, never an idempotency key
    retry_scoped_key: bool = False  # the key covers one call's retries only (``Idempotency-Scope: retry``)
    traceparent: str | None = None  # W3C trace context sent by the partner, continued by the request span
    tracestate: str | None = None


class Core:
    def __init__(
        self,
        authenticator: Authenticator,
        router: Router,
        limits: Limits,
        metrics: Metrics,
        admission: Admission,
        ledger: UsageSink,
        usage: UsageSource,
        keys: IdempotencyKeys,
        tracing: Tracing | None = None,
        catalog: Catalog | None = None,
        credits: CreditSource | None = None,
    ) -> None:
        self._tracing = tracing or Tracing.disabled()
        # Model names → models (aliases, versions, sunsets); by default the router's models and no alias.
        self._catalog = catalog or Catalog([route.spec for route in router.routes.values()])
        self._auth = authenticator
        self._router = router
        self._limits = limits
        self._metrics = metrics
        self._admission = admission
        self._ledger = ledger
        self._usage = usage
        self._keys = keys
        self._credits = credits
        self._active = 0  # calls begun and not yet finished
        self._idle = asyncio.Event()
        self._storing: set[asyncio.Task[None]] = set()  # idempotency outcomes being stored
        self.draining = False

    # --- the operations -------------------------------------------------------------------------------

    async def embed(self, ctx: CallContext, req: EmbedRequest) -> EmbedResult:
        call = self._begin("embed", req.model)
        try:
            route = await self._prepare(call, ctx, req.request_id, Task.EMBED)
            if (replayed := await self._replay(call, ctx, req)) is not None:
                return expect_outcome(replayed, EmbedResult)
            tokens = validation.texts(req.texts, self._limits, route.codec, route.spec)
            await self._admit(call, ctx, tokens)
            vectors = await self._bounded(route.infer(list(req.texts), call.span), ctx)
            call.usage = Usage(input_tokens=tokens)
            call.result = EmbedResult(call.model, vectors, call.usage, call.request_id)
            return call.result
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            await self._finish(call)

    async def classify(self, ctx: CallContext, req: ClassifyRequest) -> ClassifyResult:
        call = self._begin("classify", req.model)
        try:
            route = await self._prepare(call, ctx, req.request_id, Task.CLASSIFY)
            if (replayed := await self._replay(call, ctx, req)) is not None:
                return expect_outcome(replayed, ClassifyResult)
            tokens = validation.texts(req.texts, self._limits, route.codec, route.spec)
            labels = validation.labels(req.labels, route.spec, self._limits)
            await self._admit(call, ctx, tokens)
            results = await self._bounded(route.infer([(text, labels) for text in req.texts], call.span), ctx)
            call.usage = Usage(input_tokens=tokens)
            call.result = ClassifyResult(call.model, results, call.usage, call.request_id)
            return call.result
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            await self._finish(call)

    async def generate(self, ctx: CallContext, req: GenerateRequest) -> GenerateResult:
        # The same path as streaming, so that temperature-0 output is identical either way.
        text: list[str] = []
        final: GenerateResult | None = None
        async with contextlib.aclosing(await self.generate_stream(ctx, req)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                else:
                    final = event
        if final is None:
            raise AssertionError("a generation stream ended without its final event")
        return replace(final, text="".join(text))

    async def generate_stream(self, ctx: CallContext, req: GenerateRequest) -> EventStream:
        """Authenticates, validates and admits now (errors raise before any event); then streams. The caller
        must ``aclose()`` the stream whatever happens (``contextlib.aclosing``): that settles a stream it
        never iterated too."""
        call = self._begin("generate", req.model)
        try:
            route = await self._prepare(call, ctx, req.request_id, Task.GENERATE)
            if (replayed := await self._replay(call, ctx, req)) is not None:
                final = expect_outcome(replayed, GenerateResult)
                await self._finish(call)
                return EventStream(replay_events(final), nothing_to_settle)
            params = validation.sampling(req, self._limits)
            prompt = validation.prompt_ids(req, route.codec, route.spec, self._limits)
            # Reserve the most it can cost; settling refunds what it did not use.
            await self._admit(call, ctx, len(prompt), params.max_tokens)
        except BaseException as exc:
            call.fail(exc)
            await self._finish(call)
            raise
        item = GenerateItem(prompt_ids=prompt, params=params)
        return EventStream(self._stream(call, ctx, route, item), functools.partial(self._abandoned, call, item))

    async def _abandoned(self, call: Call, item: GenerateItem) -> None:
        """A stream closed before its first event was asked for (the client left before the body started)."""
        call.status = "cancelled"
        call.usage = Usage(len(item.prompt_ids), 0)
        await self._finish(call)

    async def _stream(
        self, call: Call, ctx: CallContext, route: ModelRoute, item: GenerateItem
    ) -> AsyncIterator[StreamEvent]:
        # Output tokens whose text was handed to the front door: what a stream that stops now is billed. A delta
        # counts from the moment it is handed over, so a cancel that lands while the transport sends it can only
        # over-bill by the deltas still in the transport's buffers (the client may not have got them), never under.
        sent_tokens = 0
        deadline = None if ctx.timeout_s is None else asyncio.get_running_loop().time() + ctx.timeout_s
        pace = StreamPace(self._metrics, call.model, call.started_perf)
        try:
            # The Ray hop of a stream: from the call to the replica's engine until its last event.
            with self._tracing.stage("ray.generate", call.span):
                async with asyncio.timeout_at(deadline):
                    async for event in route.generate(item):
                        if isinstance(event, GenerateOutput):
                            call.usage = Usage(len(item.prompt_ids), event.output_tokens)
                            usage, request_id = call.usage, call.request_id
                            final = GenerateResult(
                                call.model, event.text, event.finish_reason, usage, request_id, int(call.started)
                            )
                            call.result = final
                            await self._finish(call)  # recorded (and kept for replay) before the client sees it
                            yield final
                            return
                        if event.text:
                            pace.chunk()
                            sent_tokens = event.tokens
                            call.delivered = True
                            yield TextDelta(event.text, event.tokens)
        except BaseException as exc:
            if call.finished:  # the final event was delivered; closing the stream afterwards changes nothing
                raise
            call.fail(exc)
            call.usage = Usage(len(item.prompt_ids), sent_tokens)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("the request exceeded its deadline") from exc
            raise
        finally:
            await self._finish(call)

    async def list_models(self, ctx: CallContext) -> list[ModelInfo]:
        caller = await self.authenticate(ctx)
        return [m for m in self.models() if self._catalog.allows(caller.plan, m.id)]

    def models(self) -> list[ModelInfo]:
        """Every model (versions included) and alias, with deprecation and sunset."""
        return self._catalog.describe({model: route.dimensions for model, route in self._router.routes.items()})

    async def usage(self, ctx: CallContext, start_day: str, end_day: str) -> UsageReport:
        """The caller's own usage by day, model and operation; the key alone decides whose."""
        caller = await self.authenticate(ctx, USAGE_READ)
        start, end = validation.day_range(start_day, end_day, datetime.datetime.now(datetime.UTC).date())
        rows = await asyncio.to_thread(self._usage, caller.partner_id, start, end)
        return UsageReport(caller.partner_id, start, end, rows)

    async def credits(self, ctx: CallContext) -> dict[str, Any]:
        """The caller's own credit grants and balance; the credential alone decides whose."""
        caller = await self.authenticate(ctx, USAGE_READ)
        if self._credits is None:
            raise RouteNotFound("credits are not served by this gateway")
        return await self._credits.statement(caller)

    async def authenticate(self, ctx: CallContext, scope: str | None = None) -> Caller:
        """The key or access token, the IP rule, and the operation's scope (None: any valid credential)."""
        caller = await self._auth.authenticate(ctx.api_key)
        if not caller.plan.allows_ip(ctx.peer):
            raise PermissionDenied(f"requests from {ctx.peer} are not in your plan's IP allowlist", param="peer")
        if scope is not None and caller.scopes is not None and scope not in caller.scopes:
            held = format_scopes(caller.scopes) or "none"
            raise InsufficientScope(
                f"this credential lacks the {scope!r} scope (it has: {held}); use a key or request a token with"
                f" scope {scope}",
                scope=scope,
            )
        return caller

    # --- shared steps ---------------------------------------------------------------------------------

    def _begin(self, operation: str, model: str) -> Call:
        self._metrics.child(self._metrics.in_flight, operation).inc()
        self._active += 1
        self._idle.clear()
        return Call(operation, model)

    def start_draining(self) -> None:
        """A graceful stop: new inference calls get UNAVAILABLE (retry elsewhere); calls in flight go on."""
        self.draining = True
        if not self._active:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """After ``start_draining``: waits until every call has finished; False when the timeout came first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _prepare(self, call: Call, ctx: CallContext, request_id: str, task: Task) -> ModelRoute:
        call.peer = ctx.peer
        call.correlation_id = ctx.correlation_id
        if self.draining:
            raise Unavailable("this gateway is shutting down; retry (another replica answers)", retry_after_s=1.0)
        call.span = self._tracing.start_request(call.operation, call.model, ctx.traceparent, ctx.tracestate)
        with self._tracing.stage("prepare", call.span):
            call.caller = await self.authenticate(ctx, scope_for(task))
            call.request_id = ctx.meta.request_id = validation.request_id(request_id)
            # An alias draws its version from the request id: a retry with the same key meets the same version.
            resolved = self._catalog.resolve(call.model, call.request_id, task)
            route = self._router.route(resolved.model, task)
            call.model = ctx.meta.model = resolved.model  # what responses, the ledger and the metrics name
            if not self._catalog.allows(call.caller.plan, resolved.name):
                raise PermissionDenied(f"your plan does not include model {resolved.name!r}", param="model")
            announced = resolved.announced
            ctx.meta.lifecycle = announced if announced.announced else None  # on the refusal below too
            self._catalog.refuse_retired(resolved)
            call.client_request_id = bool(request_id)
            return route

    async def _replay(self, call: Call, ctx: CallContext, request: object) -> Outcome | None:
        """With an idempotency key: claims it (None: run the request), or returns the outcome stored for it (an
        error outcome is raised), or raises why it cannot run now."""
        if not call.client_request_id:
            return None
        assert call.caller is not None
        call.fingerprint = fingerprint(call.operation, request)
        call.retry_scoped = ctx.retry_scoped_key
        outcome = await self._keys.claim(call.caller.partner_id, call.request_id, call.fingerprint, call.retry_scoped)
        if outcome is None:
            call.claimed = True
            return None
        ctx.meta.replayed = True
        if isinstance(outcome, ServingError):
            raise outcome
        call.status = "replayed"
        return outcome

    async def _admit(self, call: Call, ctx: CallContext, input_tokens: int, max_output_tokens: int = 0) -> None:
        with self._tracing.stage("admit", call.span):
            await self._admit_steps(call, ctx, input_tokens, max_output_tokens)

    async def _admit_steps(self, call: Call, ctx: CallContext, input_tokens: int, max_output_tokens: int) -> None:
        """Reserves quota and waits for a model slot. Only a request that gets through both is admitted
        (metered); any other leaves no trace, so a retry can reuse its idempotency key."""
        caller = call.caller
        assert caller is not None
        try:
            reservation = await self._admission.reserve(caller, call.model, input_tokens, max_output_tokens)
        except QuotaExceeded as exc:
            ctx.meta.rate_limits = exc.rate_limits  # type: ignore[assignment]
            raise
        ctx.meta.rate_limits = reservation.limits
        call.queued = True
        waited = time.perf_counter()
        try:
            await self._admission.enter(call.model, caller)
        except BaseException:
            self._admission.settle_soon(
                reservation, Usage(), admitted=False
            )  # not awaited: a cancel must not leak the reservation
            raise
        call.entered = True
        call.reservation = reservation
        call.queue_s = time.perf_counter() - waited

    async def _bounded(self, work: Awaitable[T], ctx: CallContext) -> T:
        try:
            async with asyncio.timeout(ctx.timeout_s):
                return await work
        except TimeoutError as exc:
            raise DeadlineExceeded("the request exceeded its deadline") from exc

    async def drain(self) -> None:
        """Waits for background settlements and idempotency outcomes still being stored (at shutdown)."""
        await asyncio.gather(*self._storing, return_exceptions=True)
        await self._admission.drain()

    async def _finish(self, call: Call) -> None:
        """Settle quota, free the model slot, record usage, observe metrics: once per request. Every step that
        accounts for the request is synchronous and comes first, so a cancel that lands in the one await (storing
        an idempotency key's outcome, shielded) cannot leave the ledger and the counters apart."""
        if call.finished:
            return
        call.finished = True
        finished_at = time.time()
        if call.entered:
            self._admission.leave(call.model)
        if call.reservation is not None and call.refused_by_model():
            # The model turned it away before producing anything (at capacity, or its replica is gone): like a
            # request the gateway shed, it costs nothing, leaves no record, and its idempotency key is free again.
            self._admission.settle_soon(call.reservation, Usage(), admitted=False)
            call.reservation = None
        if call.reservation is not None:
            assert call.caller is not None
            self._ledger.record(
                UsageRecord(
                    request_id=call.request_id,
                    partner_id=call.caller.partner_id,
                    key_id=call.caller.key_id,
                    model=call.model,
                    operation=call.operation,
                    input_tokens=call.usage.input_tokens,
                    output_tokens=call.usage.output_tokens,
                    status=call.status,
                    queue_ms=call.queue_s * 1000,
                    latency_ms=(finished_at - call.started) * 1000,
                    started_at=call.started,
                    finished_at=finished_at,
                )
            )
            self._admission.settle_soon(call.reservation, call.usage)
        self._observe(call, finished_at - call.started)
        access_log.write(
            access,
            request_id=call.request_id,
            partner_id=call.caller.partner_id if call.caller is not None else None,
            model=call.model,
            operation=call.operation,
            status=call.status,
            latency_s=finished_at - call.started,
            queue_s=call.queue_s,
            input_tokens=call.usage.input_tokens,
            output_tokens=call.usage.output_tokens,
            peer=call.peer,
            correlation_id=call.correlation_id,
            finished_at=finished_at,
        )
        partner = call.caller.partner_id if call.caller is not None else None
        self._tracing.end_request(call.span, call.status, partner, call.request_id)
        storing = self._store_outcome(call) if call.claimed else None
        self._active -= 1
        if self.draining and not self._active:
            self._idle.set()
        if storing is not None:
            await asyncio.shield(storing)  # a cancel here leaves the write running; drain() waits for it

    def _store_outcome(self, call: Call) -> asyncio.Task[None]:
        assert call.caller is not None
        admitted = call.reservation is not None
        task = asyncio.get_running_loop().create_task(
            self._keys.settle(
                call.caller.partner_id,
                call.request_id,
                call.fingerprint,
                admitted,
                call.result,
                call.error,
                call.usage.output_tokens,
                call.retry_scoped,
            )
        )
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)
        return task

    def _observe(self, call: Call, elapsed: float) -> None:
        metrics = self._metrics
        metrics.child(metrics.in_flight, call.operation).dec()
        # The model label is whatever the client sent: names outside the registry share one series.
        model = call.model if call.model in self._router.routes else "unknown"
        metrics.child(metrics.requests, model, call.operation, call.status).inc()
        metrics.child(metrics.latency, model, call.operation).observe(elapsed)
        if call.queued:
            metrics.child(metrics.queue_wait, call.model).observe(call.queue_s)
        if call.caller is not None and call.reservation is not None:
            partner = call.caller.partner_id
            metrics.child(metrics.partner_requests, partner, call.model, call.operation, call.status).inc()
            metrics.child(metrics.partner_tokens, partner, call.model, "input").inc(call.usage.input_tokens)
            metrics.child(metrics.partner_tokens, partner, call.model, "output").inc(call.usage.output_tokens)
            if call.operation == "generate":
                metrics.generated_tokens.labels(call.model).inc(call.usage.output_tokens)
        if call.quota_reason:
            metrics.quota_rejections.labels(model, call.quota_reason).inc()
