"""OpenAI-compatible routes: ``POST /v1/embeddings``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream``) and ``GET /v1/models/{id}``; ``GET /v1/models`` already answers in OpenAI's list shape
(see ``http``).

The official ``openai`` client works unchanged against them. Errors leave with OpenAI's codes
(``rate_limit_exceeded``, ``insufficient_quota``, ``context_length_exceeded``, ...), and ``finish_reason`` is
always one of OpenAI's. Chat and legacy completions are one path that differs only in the shape of a choice."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from serving.domain import EmbedRequest, FinishReason, GenerateRequest, GenerateResult, Task, TextDelta
from serving.errors import (
    InvalidInput,
    ModelNotFound,
    ServingError,
    UnsupportedParameter,
    UnsupportedValue,
)
from serving.gateway import http_schemas as schemas
from serving.gateway.core import CallContext, Core
from serving.gateway.http_common import (
    HttpConfig,
    call_context,
    error_response,
    request_id_header,
    sse,
    validation_error,
)
from serving.gateway.openai_tokens import OpenAITokens
from serving.gateway.stream import EventStream
from serving.identity.scopes import EMBED

# OpenAI's set has no "cancelled" (a generation whose caller left; in practice no client receives it): "length"
# tells a client the text may be cut short, which "stop" would hide.
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "length"}

TOKEN_IDS_UNSUPPORTED = (
    "{field} as token ids is not supported here: send text (token ids are accepted by /v1/embeddings only)"
)


def openai_error(exc: ServingError) -> ServingError:
    """A core error as the OpenAI routes name it: the embed request's ``texts`` is the body's ``input``."""
    param = exc.param
    if not isinstance(exc, InvalidInput) or param is None or not param.startswith("texts"):
        return exc
    return type(exc)(exc.message.replace("texts", "input", 1), param="input" + param.removeprefix("texts"))


class OpenAIRoute(APIRoute):
    """A route whose errors (body validation and domain errors alike) leave with OpenAI's codes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(validation_error(exc), openai=True)
            except ServingError as exc:
                return error_response(openai_error(exc), openai=True)

        return route


# --- what a request may not ask for ---------------------------------------------------------------------


def _check_generation(body: schemas.OpenAIGenerationBody) -> None:
    if body.n != 1:
        raise UnsupportedValue(f"n must be 1 (one choice per request); got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise UnsupportedValue(f"{name} is not supported; send 0 or leave it out", param=name)
    if body.logit_bias:
        raise UnsupportedParameter("logit_bias is not supported; send {} or leave it out", param="logit_bias")


def check_chat(body: schemas.OpenAIChatBody) -> None:
    """Rejects what chat cannot honour (answering without it would be silently wrong); neutral values pass."""
    _check_generation(body)
    features = {
        "tools": bool(body.tools),
        "tool_choice": body.tool_choice not in (None, "none"),
        "functions": bool(body.functions),
        "function_call": body.function_call not in (None, "none"),
        "logprobs": bool(body.logprobs),
        "top_logprobs": bool(body.top_logprobs),
        "audio": body.audio is not None,
        "web_search_options": body.web_search_options is not None,
    }
    for name, used in features.items():
        if used:
            raise UnsupportedParameter(f"{name} is not supported by this API", param=name)
    if body.response_format is not None and body.response_format.type != "text":
        raise UnsupportedValue(
            f"response_format {body.response_format.type!r} is not supported; only 'text'", param="response_format"
        )
    if body.modalities is not None and body.modalities != ["text"]:
        raise UnsupportedValue("modalities must be ['text']", param="modalities")


def check_completion(body: schemas.OpenAICompletionBody) -> str:
    """Rejects what legacy completions cannot honour; returns the one prompt."""
    _check_generation(body)
    if body.echo:
        raise UnsupportedParameter("echo is not supported by this API", param="echo")
    if body.best_of is not None and body.best_of != 1:
        raise UnsupportedValue(f"best_of must be 1; got {body.best_of}", param="best_of")
    if body.logprobs is not None:
        raise UnsupportedParameter("logprobs is not supported by this API", param="logprobs")
    if body.suffix:
        raise UnsupportedParameter("suffix is not supported by this API", param="suffix")
    prompt = body.prompt
    if not isinstance(prompt, str):
        prompts = [item for item in prompt if isinstance(item, str)]
        if len(prompts) != len(prompt):
            raise UnsupportedValue(TOKEN_IDS_UNSUPPORTED.format(field="prompt"), param="prompt")
        if len(prompts) != 1:
            raise UnsupportedValue(f"prompt holds {len(prompts)} prompts; send exactly one per request", param="prompt")
        prompt = prompts[0]
    if not prompt.strip():
        raise InvalidInput("prompt is empty", param="prompt")
    return prompt


def embedding_texts(body: schemas.OpenAIEmbeddingsBody, tokens: OpenAITokens) -> list[str]:
    """The texts to embed: as sent, or decoded from OpenAI token ids (``openai_tokens``)."""
    if isinstance(body.input, str):
        return [body.input]
    if body.input and all(isinstance(item, str) for item in body.input):
        return [item for item in body.input if isinstance(item, str)]
    if body.input and all(isinstance(item, int) for item in body.input):
        return tokens.texts([[item for item in body.input if isinstance(item, int)]], nested=False)
    if body.input and all(isinstance(item, list) for item in body.input):
        return tokens.texts([item for item in body.input if isinstance(item, list)], nested=True)
    raise InvalidInput("input must hold at least one text", param="input")


# --- chat and legacy completions: one path, two shapes -----------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What tells a chat completion from a legacy (text) completion on the wire."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk_choice(self, text: str, first: bool, finish: str | None) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("cmpl", "text_completion", "text_completion", chat=False)


def _usage(result: GenerateResult) -> dict[str, int]:
    prompt, completion = result.usage.input_tokens, result.usage.output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(
    stream: EventStream, shape: Shape, model: str, request_id: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": f"{shape.id_prefix}-{request_id}", "object": shape.chunk_object, "created": created}
        return f"data: {json.dumps(body | {'model': model, 'choices': choices} | extra)}\n\n"

    first = True
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                yield chunk([shape.chunk_choice(event.text, first, None)])
                first = False
                continue
            request_id = event.request_id
            yield chunk([shape.chunk_choice("", first, FINISH_REASONS[event.finish_reason])])
            if include_usage:
                yield chunk([], usage=_usage(event))
    except Exception as exc:  # headers are gone: the error travels as the last event
        error = openai_error(exc) if isinstance(exc, ServingError) else exc
        yield f"data: {bytes(error_response(error, openai=True).body).decode()}\n\n"
    yield "data: [DONE]\n\n"


async def generation(
    core: Core, ctx: CallContext, req: GenerateRequest, body: schemas.OpenAIGenerationBody, shape: Shape
) -> Response:
    """Runs a chat or legacy completion through the core (auth, quota, idempotency, metering), streamed or not."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = await core.generate_stream(ctx, req)
        model = ctx.meta.model or body.model  # the version serving the call (an alias resolved)
        return sse(_events(stream, shape, model, ctx.meta.request_id, include_usage), stream)
    result = await core.generate(ctx, req)
    return JSONResponse(
        {
            "id": f"{shape.id_prefix}-{result.request_id}",
            "object": shape.object,
            "created": result.created,
            "model": result.model,
            "choices": [shape.choice(result.text, FINISH_REASONS[result.finish_reason])],
            "usage": _usage(result),
        },
    )


def _generate_request(
    body: schemas.OpenAIGenerationBody, request: Request, max_tokens: int | None, **content: Any
) -> GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerateRequest(
        model=body.model,
        max_tokens=max_tokens,
        temperature=None if body.temperature is None else float(body.temperature),
        top_p=None if body.top_p is None else float(body.top_p),
        stop=stop,
        seed=body.seed,
        request_id=request_id_header(request),  # empty: the core names the request, and nothing is claimed
        **content,
    )


def openai_router(core: Core, config: HttpConfig) -> APIRouter:
    router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
    openai_tokens = OpenAITokens()

    @router.post("/v1/embeddings")
    async def embeddings(body: schemas.OpenAIEmbeddingsBody, request: Request) -> JSONResponse:
        ctx = call_context(request, config)
        texts = embedding_texts(body, openai_tokens)
        if body.dimensions is not None:
            native = next((m.dimensions for m in core.models() if m.id == body.model and m.task is Task.EMBED), None)
            if native and body.dimensions != native:  # 0: an alias over models of different widths
                await core.authenticate(ctx, EMBED)  # the credential first, as for any other invalid input
                raise UnsupportedValue(
                    f"{body.model} returns {native} dimensions and cannot shorten them; send dimensions={native}"
                    " or leave it out",
                    param="dimensions",
                )
        result = await core.embed(ctx, EmbedRequest(body.model, texts, request_id_header(request)))
        data = []
        for i, vector in enumerate(result.embeddings):
            encoded: Any = vector
            if body.encoding_format == "base64":
                encoded = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        used = result.usage.input_tokens
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": result.model,
                "usage": {"prompt_tokens": used, "total_tokens": used},
            },
        )

    @router.post("/v1/chat/completions")
    async def chat_completions(body: schemas.OpenAIChatBody, request: Request) -> Response:
        ctx = call_context(request, config)
        check_chat(body)
        messages = [m.domain() for m in body.messages]
        req = _generate_request(body, request, body.max_completion_tokens or body.max_tokens, messages=messages)
        return await generation(core, ctx, req, body, CHAT)

    @router.post("/v1/completions")
    async def completions(body: schemas.OpenAICompletionBody, request: Request) -> Response:
        ctx = call_context(request, config)
        prompt = check_completion(body)
        req = _generate_request(body, request, body.max_tokens, prompt=prompt)
        return await generation(core, ctx, req, body, TEXT)

    @router.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard, response_model_exclude_none=True)
    async def model(model_id: str, request: Request) -> schemas.ModelCard:
        """One model, if the caller's plan includes it (else 404, as for a model that does not exist)."""
        for info in await core.list_models(call_context(request, config)):
            if info.id == model_id:
                return schemas.ModelCard.of(info)
        raise ModelNotFound(f"model {model_id!r} does not exist; GET /v1/models lists the models", param="model")

    return router
