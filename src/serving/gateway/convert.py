"""Every conversion between generated protobuf messages and the internal types. The only module that
touches ``_pb2`` code besides the gRPC wiring."""

from __future__ import annotations

from serving.domain import (
    ChatMessage,
    Classification,
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
from serving.metering.usage import UsageReport, UsageRow
from serving.v1 import common_pb2, inference_pb2, models_pb2, usage_pb2

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


def models_response(models: list[ModelInfo]) -> models_pb2.ListModelsResponse:
    return models_pb2.ListModelsResponse(
        models=[
            models_pb2.ModelInfo(
                id=m.id,
                task=_TASK[m.task],
                dimensions=m.dimensions,
                max_input_tokens=m.max_input_tokens,
                ready=m.ready,
            )
            for m in models
        ]
    )


# --- the client's direction: domain → request messages, response messages → domain --------------------

_FINISH_BACK = {wire: reason for reason, wire in _FINISH.items()}
_TASK_BACK = {wire: task for task, wire in _TASK.items()}


def _usage_back(usage: common_pb2.Usage) -> Usage:
    return Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def embed_request_message(req: EmbedRequest) -> inference_pb2.EmbedRequest:
    return inference_pb2.EmbedRequest(model=req.model, texts=req.texts, request_id=req.request_id)


def embed_result(msg: inference_pb2.EmbedResponse) -> EmbedResult:
    return EmbedResult(
        model=msg.model,
        embeddings=[list(e.values) for e in msg.embeddings],
        usage=_usage_back(msg.usage),
        request_id=msg.request_id,
    )


def classify_request_message(req: ClassifyRequest) -> inference_pb2.ClassifyRequest:
    return inference_pb2.ClassifyRequest(model=req.model, texts=req.texts, labels=req.labels, request_id=req.request_id)


def classify_result(msg: inference_pb2.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        model=msg.model,
        results=[Classification(r.label, [(s.label, s.score) for s in r.scores]) for r in msg.results],
        usage=_usage_back(msg.usage),
        request_id=msg.request_id,
    )


def generate_request_message(req: GenerateRequest) -> inference_pb2.GenerateRequest:
    msg = inference_pb2.GenerateRequest(
        model=req.model,
        messages=[inference_pb2.ChatMessage(role=m.role, content=m.content) for m in req.messages],
        prompt=req.prompt,
        max_tokens=req.max_tokens or 0,
        stop=req.stop,
        request_id=req.request_id,
    )
    if req.temperature is not None:
        msg.temperature = req.temperature
    if req.top_p is not None:
        msg.top_p = req.top_p
    if req.seed is not None:
        msg.seed = req.seed
    return msg


def generate_result(msg: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        model=msg.model,
        text=msg.text,
        finish_reason=_FINISH_BACK.get(msg.finish_reason, FinishReason.STOP),
        usage=_usage_back(msg.usage),
        request_id=msg.request_id,
    )


def stream_event_back(msg: inference_pb2.GenerateStreamResponse) -> StreamEvent:
    if msg.WhichOneof("event") == "delta":
        return TextDelta(msg.delta, msg.output_tokens)
    return generate_result(msg.final)


def models_back(msg: models_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            id=m.id,
            task=_TASK_BACK[m.task],
            dimensions=m.dimensions,
            max_input_tokens=m.max_input_tokens,
            ready=m.ready,
        )
        for m in msg.models
    ]


def list_models_request() -> models_pb2.ListModelsRequest:
    return models_pb2.ListModelsRequest()


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


def usage_report(msg: usage_pb2.GetUsageResponse) -> UsageReport:
    rows = [UsageRow(r.day, r.model, r.operation, r.requests, r.input_tokens, r.output_tokens) for r in msg.rows]
    return UsageReport(msg.partner_id, msg.start_day, msg.end_day, rows)
