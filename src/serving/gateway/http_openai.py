"""OpenAI-compatible routes: ``POST /v1/embeddings`` and ``POST /v1/chat/completions`` (with ``stream``).

The official ``openai`` client works unchanged against them; ``GET /v1/models`` already answers in
OpenAI's list shape (see ``http``)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.domain import EmbedRequest, GenerateRequest, GenerateResult, TextDelta
from serving.errors import InvalidInput
from serving.gateway import http_schemas as schemas
from serving.gateway.core import Core
from serving.gateway.http_common import HttpConfig, call_context, error_response, request_id_header, sse
from serving.gateway.stream import EventStream


def _chat_request(body: schemas.OpenAIChatBody, request: Request) -> GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerateRequest(
        model=body.model,
        messages=[m.domain() for m in body.messages],
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=None if body.temperature is None else float(body.temperature),
        top_p=None if body.top_p is None else float(body.top_p),
        stop=stop,
        seed=body.seed,
        request_id=request_id_header(request),  # empty: the core names the request, and nothing is claimed
    )


def _usage(result: GenerateResult) -> dict[str, int]:
    prompt, completion = result.usage.input_tokens, result.usage.output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(request_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> str:
    chunk = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n"


async def _chat_events(stream: EventStream, model: str, request_id: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    first = True
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                delta: dict[str, Any] = {"content": event.text}
                if first:
                    delta["role"] = "assistant"
                    first = False
                yield _chunk(request_id, model, created, delta, None)
                continue
            request_id = event.request_id
            yield _chunk(request_id, model, created, {"role": "assistant"} if first else {}, event.finish_reason.value)
            if include_usage:
                usage_chunk = {
                    "id": f"chatcmpl-{request_id}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(event),
                }
                yield f"data: {json.dumps(usage_chunk)}\n\n"
    except Exception as exc:  # headers are gone: the error travels as the last event
        yield f"data: {bytes(error_response(exc).body).decode()}\n\n"
    yield "data: [DONE]\n\n"


def openai_router(core: Core, config: HttpConfig) -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.post("/v1/embeddings")
    async def embeddings(body: schemas.OpenAIEmbeddingsBody, request: Request) -> JSONResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions is not None:
            raise InvalidInput("dimensions is not supported; the model's full width is returned", param="dimensions")
        result = await core.embed(
            call_context(request, config), EmbedRequest(body.model, texts, request_id_header(request))
        )
        data = []
        for i, vector in enumerate(result.embeddings):
            encoded: Any = vector
            if body.encoding_format == "base64":
                encoded = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = result.usage.input_tokens
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": result.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    @router.post("/v1/chat/completions")
    async def chat_completions(body: schemas.OpenAIChatBody, request: Request) -> Response:
        ctx = call_context(request, config)
        req = _chat_request(body, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = await core.generate_stream(ctx, req)
            return sse(_chat_events(stream, body.model, ctx.meta.request_id, include_usage), stream)
        result = await core.generate(ctx, req)
        return JSONResponse(
            {
                "id": f"chatcmpl-{result.request_id}",
                "object": "chat.completion",
                "created": result.created,
                "model": result.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason.value,
                    }
                ],
                "usage": _usage(result),
            },
        )

    return router
