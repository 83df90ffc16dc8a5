"""The partner SDK over gRPC: typed, sync (``Client``) and asyncio (``AsyncClient``), API key auth,
retries with exponential backoff on UNAVAILABLE, and a streaming iterator for generation.

    with Client("127.0.0.1:50051", api_key=KEY) as client:
        vectors = client.embed(["hello"]).embeddings
        for event in client.generate_stream("What is the capital of France?"):
            ...
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from serving.domain import (
    ChatMessage,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    TextDelta,
)
from serving.gateway import convert
from serving.metering.usage import UsageReport

T = TypeVar("T")
DEFAULT_EMBED_MODEL = "minilm-l6"
DEFAULT_CLASSIFY_MODEL = "zero-shot"
DEFAULT_GENERATE_MODEL = "smollm2-135m-instruct"
_INFERENCE = "/serving.v1.InferenceService/"
_MODELS = "/serving.v1.ModelService/"
_USAGE = "/serving.v1.UsageService/"


class ApiError(Exception):
    """A call failed. ``code`` is the gRPC status name; ``field`` names the bad field when there is one."""

    def __init__(self, code: str, message: str, field: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def _api_error(error: grpc.RpcError) -> ApiError:
    code = error.code().name if error.code() else "UNKNOWN"
    field, retry_after = None, None
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToMilliseconds() / 1000
    return ApiError(code, error.details() or "", field, retry_after)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, attempt: int, error: ApiError) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * float(2**attempt))
        return max(error.retry_after_s or 0.0, base * random.uniform(0.5, 1.0))


@dataclass(frozen=True)
class _Options:
    api_key: str
    timeout_s: float | None = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)


def _generate_request(prompt: str | list[ChatMessage], model: str, request_id: str, **sampling: Any) -> GenerateRequest:
    messages = prompt if isinstance(prompt, list) else [ChatMessage("user", prompt)]
    return GenerateRequest(model=model, messages=messages, request_id=request_id, **sampling)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]


class AsyncClient:
    def __init__(self, target: str, api_key: str, *, timeout_s: float | None = 60.0, retry: RetryPolicy | None = None):
        self._options = _Options(api_key, timeout_s, retry or RetryPolicy())
        self._channel = grpc.aio.insecure_channel(target)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, path: str, request: Any, parse: Callable[[Any], T], response_type: Any) -> T:
        call = self._channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        return await _with_retries(
            lambda: call(request, metadata=self._options.metadata(), timeout=self._options.timeout_s),
            parse,
            self._options.retry,
        )

    async def embed(self, texts: list[str], *, model: str = DEFAULT_EMBED_MODEL, request_id: str = "") -> EmbedResult:
        msg = convert.embed_request_message(EmbedRequest(model, texts, request_id))
        return await self._unary(_INFERENCE + "Embed", msg, convert.embed_result, _pb().EmbedResponse)

    async def classify(
        self, texts: list[str], labels: list[str], *, model: str = DEFAULT_CLASSIFY_MODEL, request_id: str = ""
    ) -> ClassifyResult:
        msg = convert.classify_request_message(ClassifyRequest(model, texts, labels, request_id))
        return await self._unary(_INFERENCE + "Classify", msg, convert.classify_result, _pb().ClassifyResponse)

    async def generate(
        self,
        prompt: str | list[ChatMessage],
        *,
        model: str = DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Any,
    ) -> GenerateResult:
        msg = convert.generate_request_message(_generate_request(prompt, model, request_id, **sampling))
        return await self._unary(_INFERENCE + "Generate", msg, convert.generate_result, _pb().GenerateResponse)

    async def generate_stream(
        self,
        prompt: str | list[ChatMessage],
        *,
        model: str = DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Text deltas, then the final GenerateResult. Breaking out of the loop cancels the call."""
        msg = convert.generate_request_message(_generate_request(prompt, model, request_id, **sampling))
        stream = self._channel.unary_stream(
            _INFERENCE + "GenerateStream",
            request_serializer=_serialize,
            response_deserializer=_pb().GenerateStreamResponse.FromString,
        )
        for attempt in range(self._options.retry.attempts):
            call = stream(msg, metadata=self._options.metadata(), timeout=self._options.timeout_s)
            received = False
            try:
                async for event in call:
                    received = True
                    yield convert.stream_event_back(event)
                return
            except grpc.RpcError as exc:
                error = _api_error(exc)
                if error.code != "UNAVAILABLE" or received or attempt + 1 == self._options.retry.attempts:
                    raise error from exc
                await asyncio.sleep(self._options.retry.delay(attempt, error))
            finally:
                call.cancel()

    async def get_usage(self, start_day: str = "", end_day: str = "") -> UsageReport:
        msg = _usage_pb().GetUsageRequest(start_day=start_day, end_day=end_day)
        return await self._unary(_USAGE + "GetUsage", msg, convert.usage_report, _usage_pb().GetUsageResponse)

    async def list_models(self) -> list[ModelInfo]:
        return await self._unary(
            _MODELS + "ListModels", convert.list_models_request(), convert.models_back, _models_pb().ListModelsResponse
        )


async def _with_retries(send: Callable[[], Awaitable[Any]], parse: Callable[[Any], T], retry: RetryPolicy) -> T:
    for attempt in range(retry.attempts):
        try:
            return parse(await send())
        except grpc.RpcError as exc:
            error = _api_error(exc)
            if error.code != "UNAVAILABLE" or attempt + 1 == retry.attempts:
                raise error from exc
            await asyncio.sleep(retry.delay(attempt, error))
    raise AssertionError("unreachable")


class Client:
    """The synchronous client: the same calls as ``AsyncClient``, blocking."""

    def __init__(self, target: str, api_key: str, *, timeout_s: float | None = 60.0, retry: RetryPolicy | None = None):
        self._options = _Options(api_key, timeout_s, retry or RetryPolicy())
        self._channel = grpc.insecure_channel(target)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, path: str, request: Any, parse: Callable[[Any], T], response_type: Any) -> T:
        call = self._channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        retry = self._options.retry
        for attempt in range(retry.attempts):
            try:
                return parse(call(request, metadata=self._options.metadata(), timeout=self._options.timeout_s))
            except grpc.RpcError as exc:
                error = _api_error(exc)
                if error.code != "UNAVAILABLE" or attempt + 1 == retry.attempts:
                    raise error from exc
                time.sleep(retry.delay(attempt, error))
        raise AssertionError("unreachable")

    def embed(self, texts: list[str], *, model: str = DEFAULT_EMBED_MODEL, request_id: str = "") -> EmbedResult:
        msg = convert.embed_request_message(EmbedRequest(model, texts, request_id))
        return self._unary(_INFERENCE + "Embed", msg, convert.embed_result, _pb().EmbedResponse)

    def classify(
        self, texts: list[str], labels: list[str], *, model: str = DEFAULT_CLASSIFY_MODEL, request_id: str = ""
    ) -> ClassifyResult:
        msg = convert.classify_request_message(ClassifyRequest(model, texts, labels, request_id))
        return self._unary(_INFERENCE + "Classify", msg, convert.classify_result, _pb().ClassifyResponse)

    def generate(
        self,
        prompt: str | list[ChatMessage],
        *,
        model: str = DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Any,
    ) -> GenerateResult:
        msg = convert.generate_request_message(_generate_request(prompt, model, request_id, **sampling))
        return self._unary(_INFERENCE + "Generate", msg, convert.generate_result, _pb().GenerateResponse)

    def generate_stream(
        self,
        prompt: str | list[ChatMessage],
        *,
        model: str = DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Any,
    ) -> Iterator[StreamEvent]:
        msg = convert.generate_request_message(_generate_request(prompt, model, request_id, **sampling))
        stream = self._channel.unary_stream(
            _INFERENCE + "GenerateStream",
            request_serializer=_serialize,
            response_deserializer=_pb().GenerateStreamResponse.FromString,
        )
        call = stream(msg, metadata=self._options.metadata(), timeout=self._options.timeout_s)
        try:
            for event in call:
                yield convert.stream_event_back(event)
        except grpc.RpcError as exc:
            raise _api_error(exc) from exc
        finally:
            call.cancel()

    def get_usage(self, start_day: str = "", end_day: str = "") -> UsageReport:
        msg = _usage_pb().GetUsageRequest(start_day=start_day, end_day=end_day)
        return self._unary(_USAGE + "GetUsage", msg, convert.usage_report, _usage_pb().GetUsageResponse)

    def list_models(self) -> list[ModelInfo]:
        return self._unary(
            _MODELS + "ListModels", convert.list_models_request(), convert.models_back, _models_pb().ListModelsResponse
        )


def _pb() -> Any:
    from serving.v1 import inference_pb2

    return inference_pb2


def _usage_pb() -> Any:
    from serving.v1 import usage_pb2

    return usage_pb2


def _models_pb() -> Any:
    from serving.v1 import models_pb2

    return models_pb2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Call the partner API over gRPC.")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--api-key", required=True)
    sub = parser.add_subparsers(dest="op", required=True)
    sub.add_parser("models")
    embed = sub.add_parser("embed")
    embed.add_argument("texts", nargs="+")
    classify = sub.add_parser("classify")
    classify.add_argument("text")
    classify.add_argument("--labels", required=True, help="comma-separated")
    generate = sub.add_parser("generate")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    with Client(args.target, args.api_key) as client:
        if args.op == "models":
            for info in client.list_models():
                print(info)
        elif args.op == "embed":
            for vector in client.embed(args.texts).embeddings:
                print(len(vector), vector[:4])
        elif args.op == "classify":
            print(client.classify([args.text], args.labels.split(",")).results[0])
        else:
            for event in client.generate_stream(args.prompt, max_tokens=args.max_tokens):
                print(event.text if isinstance(event, TextDelta) else f"\n{event.usage}", end="", flush=True)
            print()


if __name__ == "__main__":
    main()
