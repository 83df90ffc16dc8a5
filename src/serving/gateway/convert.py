"""Every conversion between generated protobuf messages and the internal types. The only module that
touches ``_pb2`` code besides the gRPC wiring."""

from __future__ import annotations

from typing import Any

from serving.domain import (
    ChatMessage,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Task,
    TextDelta,
    Usage,
)
from serving.metering.usage import UsageReport
from serving_sdk.v1 import common_pb2, inference_pb2, models_pb2, usage_pb2

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
}
_TASK = {
    Task.EMBED: models_pb2.TASK_EMBED,
    Task.CLASSIFY: models_pb2.TASK_CLASSIFY,
    Task.GENERATE: models_pb2.TASK_GENERATE,
}


def _usage(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def embed_request(msg: inference_pb2.EmbedRequest) -> EmbedRequest:
    return EmbedRequest(model=msg.model, texts=list(msg.texts), request_id=msg.request_id)


def embed_response(result: EmbedResult) -> inference_pb2.EmbedResponse:
    return inference_pb2.EmbedResponse(
        model=result.model,
        embeddings=[inference_pb2.Embedding(values=vector) for vector in result.embeddings],
        usage=_usage(result.usage),
        request_id=result.request_id,
    )


def classify_request(msg: inference_pb2.ClassifyRequest) -> ClassifyRequest:
    return ClassifyRequest(model=msg.model, texts=list(msg.texts), labels=list(msg.labels), request_id=msg.request_id)


def classify_response(result: ClassifyResult) -> inference_pb2.ClassifyResponse:
    return inference_pb2.ClassifyResponse(
        model=result.model,
        results=[
            inference_pb2.Classification(
                label=c.label,
                scores=[inference_pb2.LabelScore(label=label, score=score) for label, score in c.scores],
            )
            for c in result.results
        ],
        usage=_usage(result.usage),
        request_id=result.request_id,
    )


def generate_request(msg: inference_pb2.GenerateRequest) -> GenerateRequest:
    return GenerateRequest(
        model=msg.model,
        messages=[ChatMessage(role=m.role, content=m.content) for m in msg.messages],
        prompt=msg.prompt,
        max_tokens=msg.max_tokens or None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        stop=list(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
        request_id=msg.request_id,
    )


def generate_response(result: GenerateResult) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        model=result.model,
        text=result.text,
        finish_reason=_FINISH[result.finish_reason],
        usage=_usage(result.usage),
        request_id=result.request_id,
    )


def stream_event(event: StreamEvent) -> inference_pb2.GenerateStreamResponse:
    if isinstance(event, TextDelta):
        return inference_pb2.GenerateStreamResponse(delta=event.text, output_tokens=event.output_tokens)
    return inference_pb2.GenerateStreamResponse(final=generate_response(event))


def _model_info(m: ModelInfo) -> models_pb2.ModelInfo:
    info = models_pb2.ModelInfo(
        id=m.id,
        task=_TASK[m.task],
        dimensions=m.dimensions,
        max_input_tokens=m.max_input_tokens,
        ready=m.ready,
        version=m.version,
        targets=[models_pb2.AliasTarget(model=model, weight=weight) for model, weight in m.targets],
        replacement=m.replacement,
    )
    if m.deprecated is not None:
        info.deprecated.FromDatetime(m.deprecated)
    if m.sunset is not None:
        info.sunset.FromDatetime(m.sunset)
    return info


def models_response(models: list[ModelInfo]) -> models_pb2.ListModelsResponse:
    return models_pb2.ListModelsResponse(models=[_model_info(m) for m in models])


# --- usage ---------------------------------------------------------------------------------------------


def usage_request(msg: usage_pb2.GetUsageRequest) -> tuple[str, str]:
    return msg.start_day, msg.end_day


def usage_response(report: UsageReport) -> usage_pb2.GetUsageResponse:
    return usage_pb2.GetUsageResponse(
        partner_id=report.partner_id,
        start_day=report.start_day,
        end_day=report.end_day,
        rows=[
            usage_pb2.UsageRow(
                day=r.day,
                model=r.model,
                operation=r.operation,
                requests=r.requests,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
            )
            for r in report.rows
        ],
    )


def credits_response(statement: dict[str, Any]) -> usage_pb2.GetCreditsResponse:
    """``Prepaid.statement``'s JSON shape as the proto (money stays decimal strings)."""
    return usage_pb2.GetCreditsResponse(
        partner_id=statement["partner"],
        currency=statement["currency"],
        prepaid=statement["prepaid"],
        balance=statement["balance"],
        held=statement["held"],
        grants=[
            usage_pb2.CreditGrant(
                id=g["id"],
                kind=g["kind"],
                amount=g["amount"],
                used=g["used"],
                held=g["held"],
                remaining=g["remaining"],
                priority=g["priority"],
                granted_at=g["granted_at"],
                expires_at=g["expires_at"] or 0,
                status=g["status"],
            )
            for g in statement["grants"]
        ],
    )
