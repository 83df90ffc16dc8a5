"""The asyncio client (grpc.aio): the same calls as ``serving_sdk.Client``, awaitable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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

# The retry wait, under a name of its own: a test records the waits by replacing this, not asyncio.sleep for
# every coroutine on its loop.
_sleep = asyncio.sleep


class AsyncClient(ClientBase):
    __doc__ = ClientBase.__doc__

    def _open_channel(self, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        credentials = self.config.credentials
        if credentials is None:
            return grpc.aio.insecure_channel(self.config.target, options)
        return grpc.aio.secure_channel(self.config.target, credentials, options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, call: Call, send: Callable[..., Awaitable[R]], request: Any, parse: Callable[[R], T]) -> T:
        attempt = 0
        while True:
            try:
                return parse(await send(request, metadata=call.metadata, timeout=call.remaining_s()))
            except grpc.RpcError as exc:
                error = api_error(exc, call.request_id)
                delay = call.retry_delay(attempt, error)
                if delay is None:
                    raise error from exc
            await _sleep(delay)
            attempt += 1

    async def embed(
        self, texts: Sequence[str], *, model: str = _base.DEFAULT_EMBED_MODEL, request_id: str = ""
    ) -> EmbedResult:
        """One unit vector per text, in order."""
        call, msg = self._embed(texts, model, request_id)
        return await self._unary(call, self._inference.Embed, msg, _base.embed_result)

    async def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str] = (),
        *,
        model: str = _base.DEFAULT_CLASSIFY_MODEL,
        request_id: str = "",
    ) -> ClassifyResult:
        """Each text scored against the candidate labels (zero-shot), or the model's own labels when empty."""
        call, msg = self._classify(texts, labels, model, request_id)
        return await self._unary(call, self._inference.Classify, msg, _base.classify_result)

    async def generate(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Unpack[Sampling],
    ) -> GenerateResult:
        """The whole completion. ``prompt``: a user message, or a list of ChatMessage (system, history, user)."""
        call, msg = self._generate(prompt, model, request_id, sampling)
        return await self._unary(call, self._inference.Generate, msg, _base.generate_result)

    async def generate_stream(
        self,
        prompt: Prompt,
        *,
        model: str = _base.DEFAULT_GENERATE_MODEL,
        request_id: str = "",
        **sampling: Unpack[Sampling],
    ) -> AsyncIterator[StreamEvent]:
        """TextDelta pieces, then the final GenerateResult. Leaving the loop early cancels the call (billed for the
        tokens sent). A failure before the first piece is retried like a unary call; after it, it is raised."""
        call, msg = self._generate(prompt, model, request_id, sampling)
        attempt = 0
        while True:
            stream = self._inference.GenerateStream(msg, metadata=call.metadata, timeout=call.remaining_s())
            received = False
            try:
                async for event in stream:
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
            await _sleep(delay)
            attempt += 1

    async def get_usage(self, start_day: str = "", end_day: str = "") -> UsageReport:
        """This partner's usage per day, model and operation (UTC days, YYYY-MM-DD; defaults: month to date)."""
        request = _base.usage_request(start_day, end_day)
        return await self._unary(self._call(), self._usage.GetUsage, request, _base.usage_result)

    async def get_credits(self) -> CreditBalance:
        """This partner's credit grants, what is left of each, and its balance (live on a prepaid plan)."""
        request = usage_pb2.GetCreditsRequest()
        return await self._unary(self._call(), self._usage.GetCredits, request, _base.credits_result)

    async def list_models(self) -> list[ModelInfo]:
        """The models this key's plan allows."""
        request = models_pb2.ListModelsRequest()
        return await self._unary(self._call(), self._models.ListModels, request, _base.models_result)
