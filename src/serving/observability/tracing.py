"""OpenTelemetry tracing for the request path.

One request span per call (kind SERVER), continuing the partner's W3C ``traceparent`` / ``tracestate`` when
sent (gRPC metadata or HTTP headers); child spans for the core stages (``prepare``: authenticate and route,
``admit``: request id claim, quota and fair-queue wait) and for the Ray hop (``ray.infer``: from joining a
micro-batch to its result). Each gateway micro-batch crossing the Ray boundary gets one ``model.batch`` span
that links to the hop span of every request it carries (a batch serves many traces, so it is a root with links,
not a child).

Exporters: ``off`` (no spans, no cost), ``console``, ``otlp`` (gRPC to ``otlp_endpoint``); sampling is
parent-based with a trace-id ratio for new traces. Nothing here is global: the gateway builds one ``Tracing``
from its settings and passes it in; tests pass an SDK provider with an in-memory exporter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

EXPORTERS = ("off", "console", "otlp")
_INSTRUMENTATION = "serving.gateway"


class Tracing:
    def __init__(self, tracer: trace.Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self.provider = provider
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(trace.NoOpTracer())

    @classmethod
    def from_provider(cls, provider: TracerProvider) -> Tracing:
        return cls(provider.get_tracer(_INSTRUMENTATION), provider)

    def start_request(self, operation: str, model: str, traceparent: str | None, tracestate: str | None = None) -> Span:
        """The request span; a malformed ``traceparent`` starts a new trace (W3C: ignore, do not fail)."""
        if self.provider is None:  # tracing off: nothing to continue, skip parsing on every request
            return trace.INVALID_SPAN
        carrier = {"traceparent": traceparent} if traceparent else {}
        if traceparent and tracestate:
            carrier["tracestate"] = tracestate
        parent: Context = self._propagator.extract(carrier)
        return self.tracer.start_span(
            operation,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"serving.operation": operation, "serving.model": model},
        )

    @contextmanager
    def stage(self, name: str, parent: Span | None) -> Iterator[Span]:
        """A child span of ``parent`` (not made current: the request path passes spans explicitly)."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=context)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def start_batch(self, model: str, items: int, links: Sequence[SpanContext]) -> Span:
        # It serves many requests, each linked. Its parent is the first sampled one, so that the parent-based
        # sampler keeps it whenever any request it carried is kept (a root span would be sampled on its own).
        sampled = next((link for link in links if link.is_valid and link.trace_flags.sampled), None)
        parent = trace.set_span_in_context(NonRecordingSpan(sampled)) if sampled is not None else Context()
        return self.tracer.start_span(
            "model.batch",
            context=parent,
            kind=SpanKind.CLIENT,
            links=[Link(link) for link in links if link.is_valid],
            attributes={"serving.model": model, "serving.batch.items": items, "serving.batch.requests": len(links)},
        )

    def end_request(self, span: Span | None, status: str, partner_id: str | None, request_id: str) -> None:
        if span is None:
            return
        span.set_attribute("serving.status", status)
        if request_id:
            span.set_attribute("serving.request_id", request_id)
        if partner_id:
            span.set_attribute("serving.partner_id", partner_id)
        if status != "ok":
            span.set_status(Status(StatusCode.ERROR, status))
        span.end()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def build_tracing(exporter: str, otlp_endpoint: str | None, sample_ratio: float, service_name: str) -> Tracing:
    """From the settings: ``exporter`` one of ``EXPORTERS``."""
    if exporter == "off":
        return Tracing.disabled()
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint) if otlp_endpoint else OTLPSpanExporter()
    return Tracing.from_provider(provider(BatchSpanProcessor(span_exporter), sample_ratio, service_name))


def provider(processor: SpanProcessor, sample_ratio: float, service_name: str) -> TracerProvider:
    tracer_provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    tracer_provider.add_span_processor(processor)
    return tracer_provider
