"""The HTTP front door on the partner port: native ``/v1`` routes mirroring the gRPC API, the OpenAI-compatible
routes (``http_openai``), health and readiness. Metrics and the admin API live on the ops listener
(``http_ops``), never here. Errors leave through the one error table with the body
``{"error": {"message", "type", "code", "param"}}``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serving.domain import (
    ClassifyRequest,
    EmbedRequest,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    TextDelta,
)
from serving.errors import InvalidInput
from serving.gateway import http_schemas as schemas
from serving.gateway.core import Core
from serving.gateway.http_common import (
    BodyLimit,
    HttpConfig,
    ReadyCheck,
    ResponseHeaders,
    call_context,
    error_response,
    health_routes,
    install_error_handlers,
    request_id_header,
    sse,
)
from serving.gateway.http_oauth import OAuthEndpoints, oauth_routes
from serving.gateway.http_openai import openai_router
from serving.gateway.http_webhooks import webhooks_router
from serving.gateway.stream import EventStream
from serving.webhooks.service import WebhookService


def usage_body(result: GenerateResult) -> schemas.UsageBody:
    return schemas.UsageBody(input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens)


def model_list(models: list[ModelInfo]) -> schemas.ModelList:
    return schemas.ModelList(data=[schemas.ModelCard.of(m) for m in models])


def _generate_request(body: schemas.GenerateBody, request: Request) -> GenerateRequest:
    return GenerateRequest(
        model=body.model,
        messages=[m.domain() for m in body.messages],
        prompt=body.prompt,
        max_tokens=body.max_tokens,
        temperature=None if body.temperature is None else float(body.temperature),
        top_p=None if body.top_p is None else float(body.top_p),
        stop=body.stop,
        seed=body.seed,
        request_id=body.request_id or request_id_header(request),
    )


def _generate_reply(result: GenerateResult) -> schemas.GenerateReply:
    return schemas.GenerateReply(
        model=result.model,
        text=result.text,
        finish_reason=result.finish_reason.value,
        usage=usage_body(result),
        request_id=result.request_id,
    )


async def _native_events(stream: EventStream) -> AsyncIterator[str]:
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                data = json.dumps({"delta": event.text, "output_tokens": event.output_tokens})
                yield f"event: delta\ndata: {data}\n\n"
            else:
                yield f"event: final\ndata: {_generate_reply(event).model_dump_json()}\n\n"
    except Exception as exc:  # headers are gone: the error travels as the last event
        yield f"event: error\ndata: {bytes(error_response(exc).body).decode()}\n\n"


def build_http_app(
    core: Core,
    config: HttpConfig,
    ready: ReadyCheck,
    oauth: OAuthEndpoints | None = None,
    webhooks: WebhookService | None = None,
) -> FastAPI:
    app = FastAPI(
        title="Partner model API",
        version="1.0.0",
        description="Embeddings, classification and generation. Authenticate with `Authorization: Bearer <key>`.",
        responses={code: {"model": schemas.ErrorBody} for code in (400, 401, 402, 403, 404, 410, 413, 429, 503, 504)},
    )
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(ResponseHeaders)

    install_error_handlers(app)
    health_routes(app, ready)
    if oauth is not None:
        oauth_routes(app, oauth)

    @app.post("/v1/embed", response_model=schemas.EmbedReply, tags=["inference"])
    async def embed(body: schemas.EmbedBody, request: Request) -> schemas.EmbedReply:
        result = await core.embed(
            call_context(request, config),
            EmbedRequest(body.model, body.texts, body.request_id or request_id_header(request)),
        )
        return schemas.EmbedReply(
            model=result.model,
            embeddings=result.embeddings,
            usage=schemas.UsageBody(input_tokens=result.usage.input_tokens, output_tokens=0),
            request_id=result.request_id,
        )

    @app.post("/v1/classify", response_model=schemas.ClassifyReply, tags=["inference"])
    async def classify(body: schemas.ClassifyBody, request: Request) -> schemas.ClassifyReply:
        result = await core.classify(
            call_context(request, config),
            ClassifyRequest(body.model, body.texts, body.labels, body.request_id or request_id_header(request)),
        )
        return schemas.ClassifyReply(
            model=result.model,
            results=[
                schemas.ClassificationBody(
                    label=c.label, scores=[schemas.LabelScoreBody(label=lb, score=s) for lb, s in c.scores]
                )
                for c in result.results
            ],
            usage=schemas.UsageBody(input_tokens=result.usage.input_tokens, output_tokens=0),
            request_id=result.request_id,
        )

    @app.post("/v1/generate", response_model=schemas.GenerateReply, tags=["inference"])
    async def generate(body: schemas.GenerateBody, request: Request) -> schemas.GenerateReply:
        result = await core.generate(call_context(request, config), _generate_request(body, request))
        return _generate_reply(result)

    @app.post("/v1/generate/stream", tags=["inference"], response_class=StreamingResponse)
    async def generate_stream(body: schemas.GenerateBody, request: Request) -> StreamingResponse:
        stream = await core.generate_stream(call_context(request, config), _generate_request(body, request))
        return sse(_native_events(stream), stream)

    # Unset lifecycle fields are left out: a plain model's card stays what it was before aliases and versions.
    @app.get("/v1/models", response_model=schemas.ModelList, response_model_exclude_none=True, tags=["models"])
    async def models(request: Request) -> schemas.ModelList:
        return model_list(await core.list_models(call_context(request, config)))

    @app.get("/v1/usage", response_model=schemas.UsageReply, tags=["usage"])
    async def usage(request: Request, start_day: str = "", end_day: str = "") -> schemas.UsageReply:
        """Your own usage by day, model and operation. The API key decides whose; no parameter can widen it."""
        unknown = set(request.query_params) - {"start_day", "end_day"}
        if unknown:
            raise InvalidInput(
                f"unknown query parameter(s) {sorted(unknown)}; usage is always the caller's own",
                param=sorted(unknown)[0],
            )
        report = await core.usage(call_context(request, config), start_day, end_day)
        return schemas.UsageReply(
            partner_id=report.partner_id,
            start_day=report.start_day,
            end_day=report.end_day,
            rows=report.rows,
        )

    @app.get("/v1/credits", tags=["usage"])
    async def credit_balance(request: Request) -> dict[str, Any]:
        """Your credit grants with what is left of each, and your balance (what active grants have left). On a
        prepaid plan it is live: every request holds its maximum cost, then draws its actual cost."""
        if request.query_params:
            raise InvalidInput("this route takes no query parameters; credits are always the caller's own")
        return await core.credits(call_context(request, config))

    app.include_router(openai_router(core, config))
    if webhooks is not None:
        app.include_router(webhooks_router(core, config, webhooks))
    return app
