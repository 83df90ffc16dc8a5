"""The synchronous client: the same calls as ``serving_sdk.AsyncClient``, blocking."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from serving_sdk import _base
from serving_sdk._base import Call, ClientConfig, Prompt
from serving_sdk.errors import api_error
from serving_sdk.retry import RetryPolicy
from serving_sdk.types import ClassifyResult, EmbedResult, GenerateResult, ModelInfo, StreamEvent, UsageReport
from serving_sdk.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc, usage_pb2_grpc

R = TypeVar("R")
T = TypeVar("T")


class Client:
    """``Client(target, api_key)``; both default from ``SERVING_TARGET`` / ``SERVING_API_KEY``.

    ``tls=True`` verifies the gateway against the system's roots, ``ca_file=`` against that CA. ``timeout_s``
    bounds each logical call, retries included. Every call carries an idempotency key (``request_id``, generated
    when not given), so a retry never runs or bills a call twice."""

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        tls: bool | None = None,
        ca_file: str | Path | None = None,
        timeout_s: float | None = 60.0,
        retry: RetryPolicy | None = None,
        auto_request_id: bool = True,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.config = ClientConfig.resolve(
            target, api_key, tls=tls, ca_file=ca_file, timeout_s=timeout_s, retry=retry, auto_request_id=auto_request_id
        )
        options = list(channel_options)
        if self.config.credentials is None:
            self._channel = grpc.insecure_channel(self.config.target, options)
        else:
            self._channel = grpc.secure_channel(self.config.target, self.config.credentials, options)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, call: Call, send: Callable[..., R], request: Any, parse: Callable[[R], T]) -> T:
        attempt = 0
        while True:
            try:
                return parse(send(request, metadata=call.metadata, timeout=call.remaining_s()))
            except grpc.RpcError as exc:
                error = api_error(exc, call.request_id)
                delay = call.retry_delay(attempt, error)
                if delay is None:
                    raise error from exc
            time.sleep(delay)
            attempt += 1

    def embed(
        self, texts: Sequence[str], *, model: str = _base.DEFAULT_EMBED_MODEL, request_id: str = ""
    ) -> EmbedResult:
        """One unit vector per text, in order."""
        call = Call(self.config, request_id)
        msg = _base.embed_request(texts, model, call.request_id)
        return self._unary(call, self._inference.Embed, msg, _base.embed_result)

    def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str] = (),
        *,
        model: str = _base.DEFAULT_CLASSIFY_MODEL,
        request_id: str = "",
    ) -> ClassifyResult:
        """Each text scored against the candidate labels (zero-shot), or the model's own labels when empty."""
        call = Call(self.config, request_id)
        msg = _base.classify_request(texts, labels, model, call.request_id)
        return self._unary(call, self._inference.Classify, msg, _base.classify_result)

    def generate(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        request_id: str = "",
    ) -> GenerateResult:
        """The whole completion. ``prompt``: a user message, or a list of ChatMessage (system, history, user)."""
        call = Call(self.config, request_id)
        msg = _base.generate_request(
            prompt,
            model,
            call.request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )
        return self._unary(call, self._inference.Generate, msg, _base.generate_result)

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        request_id: str = "",
    ) -> Iterator[StreamEvent]:
        """TextDelta pieces, then the final GenerateResult. Closing the iterator early cancels the call (billed for
        the tokens sent). A failure before the first piece is retried like a unary call; after it, it is raised."""
        call = Call(self.config, request_id)
        msg = _base.generate_request(
            prompt,
            model,
            call.request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )
        attempt = 0
        while True:
            stream = self._inference.GenerateStream(msg, metadata=call.metadata, timeout=call.remaining_s())
            received = False
            try:
                for event in stream:
                    received = True
                    yield _base.stream_event(event)
                return
            except grpc.RpcError as exc:
                error = api_error(exc, call.request_id)
                delay = None if received else call.retry_delay(attempt, error)
                if delay is None:
                    raise error from exc
            finally:
                stream.cancel()
            time.sleep(delay)
            attempt += 1

    def get_usage(self, start_day: str = "", end_day: str = "") -> UsageReport:
        """This partner's usage per day, model and operation (UTC days, YYYY-MM-DD; defaults: month to date)."""
        call = Call(self.config, "")
        return self._unary(call, self._usage.GetUsage, _base.usage_request(start_day, end_day), _base.usage_result)

    def list_models(self) -> list[ModelInfo]:
        call = Call(self.config, "")
        return self._unary(call, self._models.ListModels, models_pb2.ListModelsRequest(), _base.models_result)
