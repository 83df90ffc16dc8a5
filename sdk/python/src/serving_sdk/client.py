"""The synchronous client: the same calls as ``serving_sdk.AsyncClient``, blocking."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc

from serving_sdk import _base
from serving_sdk._base import Call, ClientBase, Prompt, Sampling
from serving_sdk.errors import api_error
from serving_sdk.types import (
    ClassifyResult,
    CreditBalance,
    EmbedResult,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    UsageReport,
)
from serving_sdk.v1 import models_pb2, usage_pb2

R = TypeVar("R")
T = TypeVar("T")


class Client(ClientBase):
    __doc__ = ClientBase.__doc__

    def _open_channel(self, options: list[tuple[str, Any]]) -> grpc.Channel:
        credentials = self.config.credentials
        if credentials is None:
            return grpc.insecure_channel(self.config.target, options)
        return grpc.secure_channel(self.config.target, credentials, options)

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
        call, msg = self._embed(texts, model, request_id)
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
        call, msg = self._classify(texts, labels, model, request_id)
        return self._unary(call, self._inference.Classify, msg, _base.classify_result)

    def generate(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Unpack[Sampling],
    ) -> GenerateResult:
        """The whole completion. ``prompt``: a user message, or a list of ChatMessage (system, history, user)."""
        call, msg = self._generate(prompt, model, request_id, sampling)
        return self._unary(call, self._inference.Generate, msg, _base.generate_result)

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Unpack[Sampling],
    ) -> Iterator[StreamEvent]:
        """TextDelta pieces, then the final GenerateResult. Closing the iterator early cancels the call (billed for
        the tokens sent). A failure before the first piece is retried like a unary call; after it, it is raised."""
        call, msg = self._generate(prompt, model, request_id, sampling)
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
        request = _base.usage_request(start_day, end_day)
        return self._unary(self._call(), self._usage.GetUsage, request, _base.usage_result)

    def get_credits(self) -> CreditBalance:
        """This partner's credit grants, what is left of each, and its balance (live on a prepaid plan)."""
        request = usage_pb2.GetCreditsRequest()
        return self._unary(self._call(), self._usage.GetCredits, request, _base.credits_result)

    def list_models(self) -> list[ModelInfo]:
        """The models this key's plan allows."""
        request = models_pb2.ListModelsRequest()
        return self._unary(self._call(), self._models.ListModels, request, _base.models_result)
