"""OpenTelemetry tracing with the SDK's in-memory exporter: the partner's W3C traceparent is continued, the core
stages and the Ray hop are children of the request span, and one micro-batch span links every request it carried."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.requests import Request

from serving.domain import EmbedRequest
from serving.errors import Unauthenticated
from serving.gateway.app import build_routes
from serving.gateway.core import CallContext, Core
from serving.gateway.grpc import _context
from serving.gateway.http_common import HttpConfig, call_context
from serving.gateway.router import Router
from serving.idempotency.keys import IdempotencyKeys
from serving.idempotency.store import MemoryIdempotency
from serving.models.registry import ModelSpec
from serving.observability.metrics import Metrics
from serving.observability.tracing import Tracing, provider
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.quota.admission import Admission
from serving.quota.memory import MemoryQuota
from serving.settings import Batching, Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def in_memory(sample_ratio: float = 1.0) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.from_provider(provider(SimpleSpanProcessor(exporter), sample_ratio, "test")), exporter


class NullSink:
    def record(self, record: object) -> None:
        pass


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def traced_core(
    settings: Settings, specs: list[ModelSpec], store: PartnerStore, router: Router, tracing: Tracing
) -> Core:
    """The real core over ``router``, traced by ``tracing``, with an in-memory quota and no ledger."""
    return Core(
        Authenticator(store, 5.0),
        router,
        settings.limits,
        Metrics(),
        Admission(MemoryQuota(), specs, settings.admission),
        NullSink(),
        lambda *_: [],
        IdempotencyKeys(MemoryIdempotency(60.0, 1 << 20, 60.0), lambda _partner, _key: False),
        tracing,
    )


async def test_request_stage_hop_and_batch_spans(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore, api_key: str
) -> None:
    tracing, exporter = in_memory()
    # The batch leaves only when both requests are in it (size 2, deadline far away): one batch, deterministic.
    router = Router(
        build_routes(specs, ray_models, settings.models_cache),
        Batching(max_batch_size=2, max_wait_ms=600_000, max_inflight=0),
        tracing=tracing,
    )
    core = traced_core(settings, specs, store, router, tracing)
    await asyncio.gather(
        core.embed(CallContext(api_key, traceparent=TRACEPARENT), EmbedRequest("minilm-l6", ["continued trace"])),
        core.embed(CallContext(api_key, traceparent="00-garbage"), EmbedRequest("minilm-l6", ["new trace"])),
    )
    spans = exporter.get_finished_spans()

    requests = named(spans, "embed")
    assert len(requests) == 2 and all(s.kind is SpanKind.SERVER for s in requests)
    [continued] = [s for s in requests if s.context.trace_id == int(TRACE_ID, 16)]
    [fresh] = [s for s in requests if s is not continued]
    assert continued.parent is not None and continued.parent.span_id == int(PARENT_ID, 16)
    assert fresh.parent is None  # a malformed traceparent starts a new trace instead of failing the call
    for request in requests:
        assert request.attributes is not None and request.attributes["serving.status"] == "ok"
        assert request.attributes["serving.partner_id"] and request.attributes["serving.model"] == "minilm-l6"
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id}
        assert children == {"prepare", "admit", "ray.infer"}

    [batch] = named(spans, "model.batch")
    hops = named(spans, "ray.infer")
    # Parented on a sampled hop (so it is kept whenever a request it carried is), linked to every hop.
    assert batch.parent is not None and batch.parent.span_id in {hop.context.span_id for hop in hops}
    assert batch.kind is SpanKind.CLIENT
    assert {link.context.span_id for link in batch.links} == {hop.context.span_id for hop in hops}
    assert batch.attributes is not None and batch.attributes["serving.batch.items"] == 2


async def test_a_rejected_request_ends_its_span_with_an_error(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore
) -> None:
    tracing, exporter = in_memory()
    router = Router(build_routes(specs, ray_models, settings.models_cache), settings.batching, tracing=tracing)
    core = traced_core(settings, specs, store, router, tracing)
    with pytest.raises(Unauthenticated):
        await core.embed(CallContext("not-a-key", traceparent=TRACEPARENT), EmbedRequest("minilm-l6", ["x"]))
    spans = exporter.get_finished_spans()
    [request] = named(spans, "embed")
    [prepare] = named(spans, "prepare")
    assert request.status.status_code is StatusCode.ERROR and request.attributes is not None
    assert request.attributes["serving.status"] == "unauthenticated"
    assert prepare.status.status_code is StatusCode.ERROR
    assert not named(spans, "admit") and not named(spans, "ray.infer")


def test_sampling_follows_a_sampled_partner_and_the_ratio_otherwise() -> None:
    tracing, exporter = in_memory(sample_ratio=0.0)
    tracing.start_request("embed", "m", None).end()  # a new trace at ratio 0: not sampled
    tracing.start_request("embed", "m", TRACEPARENT).end()  # the partner sampled it (flags 01): sampled
    tracing.start_request("embed", "m", f"00-{TRACE_ID}-{PARENT_ID}-00").end()  # the partner did not sample it
    [span] = exporter.get_finished_spans()
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert Tracing.disabled().start_request("embed", "m", TRACEPARENT).is_recording() is False


def test_front_doors_read_w3c_trace_context() -> None:
    request = Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/embed",
            "headers": [(b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"vendor=1")],
            "client": ("10.0.0.7", 1234),
        }
    )
    http_ctx = call_context(request, HttpConfig(1024, 30.0))
    assert (http_ctx.traceparent, http_ctx.tracestate) == (TRACEPARENT, "vendor=1")

    class FakeServicerContext:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", "Bearer k"), ("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))

        def time_remaining(self) -> float:
            return 5.0

        def peer(self) -> str:
            return "ipv4:10.0.0.7:1234"

    fake: Any = FakeServicerContext()
    grpc_ctx = _context(fake, 60.0)
    assert (grpc_ctx.api_key, grpc_ctx.traceparent, grpc_ctx.tracestate) == ("k", TRACEPARENT, "vendor=1")
