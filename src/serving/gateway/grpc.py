"""The gRPC front door: decode, call the core, encode. Errors leave through the one error table with
``google.rpc`` rich details (BadRequest, QuotaFailure, RetryInfo, ErrorInfo).

Handlers are wired by hand (not the generated ``add_*_to_server``) so that a body that fails to parse
(invalid UTF-8, wrong wire types) or is too large becomes INVALID_ARGUMENT instead of grpc's INTERNAL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from serving.errors import (
    InsufficientCredit,
    InvalidInput,
    ModelRetired,
    PayloadTooLarge,
    QuotaExceeded,
    ServingError,
    describe,
    public_message,
)
from serving.gateway import convert
from serving.gateway.core import CallContext, Core, ResponseMeta
from serving.gateway.headers import response_pairs, retry_after
from serving_sdk.v1 import inference_pb2, models_pb2, usage_pb2

INFERENCE_SERVICE = "serving.v1.InferenceService"
MODEL_SERVICE = "serving.v1.ModelService"
USAGE_SERVICE = "serving.v1.UsageService"


@dataclass(frozen=True)
class _Malformed:
    error: ServingError


def _parser(message: type[Message], max_bytes: int) -> Callable[[bytes], Message | _Malformed]:
    def parse(data: bytes) -> Message | _Malformed:
        if len(data) > max_bytes:
            return _Malformed(PayloadTooLarge(f"the request is {len(data)} bytes; at most {max_bytes}"))
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return _Malformed(InvalidInput(f"malformed {message.DESCRIPTOR.name} (strings must be valid UTF-8): {exc}"))

    return parse


@dataclass(frozen=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rich_status(exc: BaseException, meta: ResponseMeta | None = None) -> grpc.Status:
    kind = describe(exc)
    code = grpc.StatusCode[kind.grpc_code]
    message = public_message(exc)
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=kind.code.upper(), domain="serving.v1")
    if isinstance(exc, ModelRetired) and exc.replacement:
        info.metadata["replacement"] = exc.replacement  # what to call instead of the retired model
    if isinstance(exc, InsufficientCredit):  # the balance, and what the request needed, as decimal strings
        info.metadata.update(balance=exc.balance, required=exc.required, currency=exc.currency)
    details: list[Message] = [info]
    if isinstance(exc, ServingError):
        if exc.param and kind.grpc_code == "INVALID_ARGUMENT":
            violation = error_details_pb2.BadRequest.FieldViolation(field=exc.param, description=message)
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        if isinstance(exc, QuotaExceeded):
            subject = exc.param or ""
            if isinstance(exc, InsufficientCredit):
                subject = f"balance:{exc.balance} {exc.currency}"  # QuotaFailure names the balance
            violation = error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)
            details.append(error_details_pb2.QuotaFailure(violations=[violation]))
        if exc.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(exc.retry_after_s * 1000))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    for detail in details:
        status.details.add().Pack(detail)
    base = rpc_status.to_status(status)
    extra: list[tuple[str, str | bytes]] = list(response_pairs(meta)) if meta else []
    if isinstance(exc, ServingError) and exc.retry_after_s is not None:
        extra.append(("retry-after", retry_after(exc.retry_after_s)))
    return _Status(base.code, base.details, tuple(base.trailing_metadata) + tuple(extra))


def _peer_ip(peer: str) -> str | None:
    # "ipv4:10.0.0.1:5000" / "ipv6:[::1]:5000" / "unix:..."
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None


def _context(context: grpc.aio.ServicerContext, max_timeout_s: float) -> CallContext:
    api_key = None
    trace: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            api_key = token.strip() if scheme.lower() == "bearer" else None
        elif key in ("traceparent", "tracestate", "x-request-id", "idempotency-scope") and isinstance(value, str):
            trace[key] = value  # W3C trace context, the caller's correlation id, how long its key matters
    remaining = context.time_remaining()  # None: the client set no deadline; the server's cap applies
    return CallContext(
        api_key=api_key,
        timeout_s=max_timeout_s if remaining is None else min(remaining, max_timeout_s),
        correlation_id=trace.get("x-request-id"),
        retry_scoped_key=trace.get("idempotency-scope") == "retry",
        peer=_peer_ip(context.peer()),
        traceparent=trace.get("traceparent"),
        tracestate=trace.get("tracestate"),
    )


class GrpcFrontDoor:
    def __init__(self, core: Core, max_request_bytes: int, max_timeout_s: float) -> None:
        self._core = core
        self._max_bytes = max_request_bytes
        self._max_timeout_s = max_timeout_s  # calls without a deadline get this one (as HTTP calls do)

    def _unary(
        self,
        message: type[Message],
        to_domain: Callable[[Any], Any],
        call: Callable[[CallContext, Any], Awaitable[Any]],
        to_wire: Callable[[Any], Message],
    ) -> grpc.RpcMethodHandler:
        async def handle(request: Message | _Malformed, context: grpc.aio.ServicerContext) -> Message:
            ctx = _context(context, self._max_timeout_s)
            try:
                if isinstance(request, _Malformed):
                    raise request.error
                reply = to_wire(await call(ctx, to_domain(request)))
            except Exception as exc:
                await context.abort_with_status(rich_status(exc, ctx.meta))
                raise  # unreachable: abort raises
            await context.send_initial_metadata(response_pairs(ctx.meta))
            return reply

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=_parser(message, self._max_bytes), response_serializer=_serialize
        )

    def _generate_stream(self) -> grpc.RpcMethodHandler:
        # A coroutine that writes (not an async generator): a cancel lands in ``context.write`` and closes the
        # stream at once (grpc never closes a generator handler it stops iterating; only the GC would).
        async def handle(request: Message | _Malformed, context: grpc.aio.ServicerContext) -> None:
            ctx = _context(context, self._max_timeout_s)
            try:
                if isinstance(request, _Malformed):
                    raise request.error
                assert isinstance(request, inference_pb2.GenerateRequest)
                stream = await self._core.generate_stream(ctx, convert.generate_request(request))
                async with contextlib.aclosing(stream):
                    await context.send_initial_metadata(response_pairs(ctx.meta))
                    async for event in stream:
                        await context.write(convert.stream_event(event))
            except Exception as exc:
                await context.abort_with_status(rich_status(exc, ctx.meta))

        return grpc.unary_stream_rpc_method_handler(
            handle,
            request_deserializer=_parser(inference_pb2.GenerateRequest, self._max_bytes),
            response_serializer=_serialize,
        )

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        core = self._core
        inference = {
            "Embed": self._unary(inference_pb2.EmbedRequest, convert.embed_request, core.embed, convert.embed_response),
            "Classify": self._unary(
                inference_pb2.ClassifyRequest,
                convert.classify_request,
                core.classify,
                convert.classify_response,
            ),
            "Generate": self._unary(
                inference_pb2.GenerateRequest,
                convert.generate_request,
                core.generate,
                convert.generate_response,
            ),
            "GenerateStream": self._generate_stream(),
        }
        models = {
            "ListModels": self._unary(
                models_pb2.ListModelsRequest,
                lambda _request: None,
                lambda ctx, _none: core.list_models(ctx),
                convert.models_response,
            )
        }
        usage = {
            "GetUsage": self._unary(
                usage_pb2.GetUsageRequest,
                convert.usage_request,
                lambda ctx, days: core.usage(ctx, *days),
                convert.usage_response,
            ),
            "GetCredits": self._unary(
                usage_pb2.GetCreditsRequest,
                lambda _request: None,
                lambda ctx, _none: core.credits(ctx),
                convert.credits_response,
            ),
        }
        return [
            grpc.method_handlers_generic_handler(INFERENCE_SERVICE, inference),
            grpc.method_handlers_generic_handler(MODEL_SERVICE, models),
            grpc.method_handlers_generic_handler(USAGE_SERVICE, usage),
        ]


def _serialize(message: Message) -> bytes:
    return bytes(message.SerializeToString())


class Health:
    """``grpc.health.v1`` as the truth: NOT_SERVING until the models are ready and again from the moment a
    graceful stop begins. The overall status ("") and ``serving.v1.InferenceService`` follow model readiness;
    the model list and usage services need no model and serve while the gateway is not draining."""

    _MODEL_FREE = (MODEL_SERVICE, USAGE_SERVICE)

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._ready: bool | None = None

    async def starting(self) -> None:
        for service in ("", INFERENCE_SERVICE):
            await self.servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in self._MODEL_FREE:
            await self.servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def models_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            await self.servicer.set(service, status)

    async def draining(self) -> None:
        """Every service NOT_SERVING, for good (later readiness changes are ignored)."""
        await self.servicer.enter_graceful_shutdown()


async def build_grpc_server(
    core: Core,
    host: str,
    port: int,
    max_request_bytes: int,
    max_timeout_s: float,
    reuse_port: bool = False,
    tls_pem: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.aio.Server, int, Health]:
    """The server with inference, models, health and reflection; returns it with its bound port and health.

    ``reuse_port``: gateway worker processes share the port (SO_REUSEPORT). Off otherwise, so that a port in use is
    an error rather than silently shared with another server. ``tls_pem``: (certificate chain, key) for TLS."""
    # grpc's own cap sits well above ours so that oversize bodies reach our check and get INVALID_ARGUMENT.
    cap = max(16 * 1024 * 1024, 4 * max_request_bytes)
    options = [("grpc.max_receive_message_length", cap), ("grpc.so_reuseport", int(reuse_port))]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(GrpcFrontDoor(core, max_request_bytes, max_timeout_s).handlers())
    health_state = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, MODEL_SERVICE, USAGE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if tls_pem is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        cert_chain, key = tls_pem
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, cert_chain)]))
    await health_state.starting()
    return server, bound, health_state
