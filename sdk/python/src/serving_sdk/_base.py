"""What the sync and async clients share: configuration, credentials, request messages, result parsing and the
per-call bookkeeping (idempotency key, deadline). The clients add only the transport calls."""

from __future__ import annotations

import datetime
import os
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypedDict

import grpc

from serving_sdk.errors import ApiError, ConfigurationError
from serving_sdk.retry import RetryPolicy
from serving_sdk.types import (
    ChatMessage,
    Classification,
    ClassifyResult,
    CreditBalance,
    CreditGrant,
    EmbedResult,
    FinishReason,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Task,
    TextDelta,
    Usage,
    UsageReport,
    UsageRow,
)
from serving_sdk.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_EMBED_MODEL = "minilm-l6"
DEFAULT_CLASSIFY_MODEL = "zero-shot"
DEFAULT_GENERATE_MODEL = "smollm2-135m-instruct"
ENV_API_KEY = "SERVING_API_KEY"
ENV_TARGET = "SERVING_TARGET"

Prompt = str | Sequence[ChatMessage]

_FINISH = {
    inference_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    inference_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    inference_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}
_TASK = {
    models_pb2.TASK_EMBED: Task.EMBED,
    models_pb2.TASK_CLASSIFY: Task.CLASSIFY,
    models_pb2.TASK_GENERATE: Task.GENERATE,
}


@dataclass(frozen=True)
class ClientConfig:
    target: str
    api_key: str = field(repr=False)  # never in a log line or a traceback
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    timeout_s: float | None  # the whole logical call, retries included
    retry: RetryPolicy
    auto_request_id: bool

    @staticmethod
    def resolve(
        target: str | None,
        api_key: str | None,
        *,
        tls: bool | None,
        ca_file: str | Path | None,
        timeout_s: float | None,
        retry: RetryPolicy | None,
        auto_request_id: bool,
    ) -> ClientConfig:
        key = api_key or os.environ.get(ENV_API_KEY, "")
        if not key:
            raise ConfigurationError(f"no API key: pass api_key= or set {ENV_API_KEY}")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigurationError("timeout_s must be > 0 (or None for no deadline)")
        return ClientConfig(
            target=target or os.environ.get(ENV_TARGET, DEFAULT_TARGET),
            api_key=key,
            credentials=_credentials(tls, ca_file),
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
            auto_request_id=auto_request_id,
        )


def _system_roots() -> bytes | None:
    """The operating system's CA bundle (what OpenSSL trusts, corporate CAs included); None: grpc's bundled roots."""
    bundle = ssl.get_default_verify_paths().cafile
    return Path(bundle).read_bytes() if bundle and Path(bundle).is_file() else None


def _credentials(tls: bool | None, ca_file: str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS when asked for or when a CA file is given: verified against that CA, else the system's roots."""
    if ca_file is None:
        return grpc.ssl_channel_credentials(root_certificates=_system_roots()) if tls else None
    if tls is False:
        raise ConfigurationError("ca_file is only used with TLS; drop tls=False or ca_file")
    try:
        roots = Path(ca_file).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read ca_file {ca_file}: {exc}") from exc
    return grpc.ssl_channel_credentials(root_certificates=roots)


class Call:
    """One logical call: its idempotency key (the same on every attempt) and its deadline."""

    def __init__(self, config: ClientConfig, request_id: str, idempotent: bool = False) -> None:
        self.request_id = request_id or (uuid.uuid4().hex if config.auto_request_id else "")
        self.idempotent = idempotent  # a read: running it twice changes nothing
        auth = ("authorization", f"Bearer {config.api_key}")
        # A key the SDK made only covers this call's retries: the gateway keeps its outcome minutes, not a day.
        self.metadata = (auth, ("idempotency-scope", "retry")) if request_id == "" and self.request_id else (auth,)
        self._deadline = None if config.timeout_s is None else time.monotonic() + config.timeout_s
        self._config = config

    def remaining_s(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def retry_delay(self, attempt: int, error: ApiError) -> float | None:
        # Without an idempotency key only the gateway's own refusals (they carry ErrorInfo) are known not to have
        # run: a connection lost mid-call may have, and a retry could run and bill it twice.
        if not self.request_id and not self.idempotent and not error.reason:
            return None
        return self._config.retry.delay_before_retry(attempt, error, self.remaining_s())


class Sampling(TypedDict, total=False):
    """Generation settings; unset ones take the gateway's defaults."""

    max_tokens: int | None  # upper bound on generated tokens (default 128)
    temperature: float | None  # 0 is greedy (deterministic); default 1.0
    top_p: float | None  # nucleus sampling mass in (0, 1]
    stop: Sequence[str]  # generation stops before any of these (at most 4)
    seed: int | None  # fixes sampling for reproducible output


class ClientBase:
    """What ``Client`` and ``AsyncClient`` share: configuration, the stubs, and each call's message and bookkeeping.
    A subclass opens the channel (blocking or asyncio) and makes the transport calls.

    ``target`` and ``api_key`` default from ``SERVING_TARGET`` (else 127.0.0.1:50051) and ``SERVING_API_KEY``.
    ``tls=True`` verifies the gateway against the system's roots, ``ca_file=`` against that CA. ``timeout_s`` bounds
    each logical call, retries included. Every call carries an idempotency key (``request_id``, generated when not
    given and the same on each retry), so a retry never runs or bills a call twice."""

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
        self._channel = self._open_channel(list(channel_options))
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._usage = usage_pb2_grpc.UsageServiceStub(self._channel)

    def _open_channel(self, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def _embed(self, texts: Sequence[str], model: str, request_id: str) -> tuple[Call, inference_pb2.EmbedRequest]:
        call = Call(self.config, request_id)
        return call, inference_pb2.EmbedRequest(model=model, texts=_texts(texts), request_id=call.request_id)

    def _classify(
        self, texts: Sequence[str], labels: Sequence[str], model: str, request_id: str
    ) -> tuple[Call, inference_pb2.ClassifyRequest]:
        call = Call(self.config, request_id)
        msg = inference_pb2.ClassifyRequest(model=model, texts=_texts(texts), labels=list(labels))
        msg.request_id = call.request_id
        return call, msg

    def _generate(
        self, prompt: Prompt, model: str, request_id: str, sampling: Sampling
    ) -> tuple[Call, inference_pb2.GenerateRequest]:
        call = Call(self.config, request_id)
        return call, generate_request(prompt, model, call.request_id, sampling)

    def _call(self) -> Call:
        """A read: it needs no idempotency key and is always safe to retry."""
        return Call(self.config, "", idempotent=True)


# --- request messages ----------------------------------------------------------------------------------------


def generate_request(prompt: Prompt, model: str, request_id: str, sampling: Sampling) -> inference_pb2.GenerateRequest:
    """A string is one user message (chat template applied); a list of ChatMessage is the conversation."""
    messages = [ChatMessage("user", prompt)] if isinstance(prompt, str) else list(prompt)
    msg = inference_pb2.GenerateRequest(
        model=model,
        messages=[inference_pb2.ChatMessage(role=m.role, content=m.content) for m in messages],
        max_tokens=sampling.get("max_tokens") or 0,
        stop=list(sampling.get("stop", ())),
        request_id=request_id,
    )
    for name in ("temperature", "top_p", "seed"):
        value = sampling.get(name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def usage_request(start_day: str, end_day: str) -> usage_pb2.GetUsageRequest:
    return usage_pb2.GetUsageRequest(start_day=start_day, end_day=end_day)


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):  # a lone string would be sent as one text per character
        raise TypeError("texts must be a list of strings; wrap a single text in a list")
    return list(texts)


# --- results -----------------------------------------------------------------------------------------------


def _usage(usage: common_pb2.Usage) -> Usage:
    return Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def embed_result(msg: inference_pb2.EmbedResponse) -> EmbedResult:
    embeddings = [list(e.values) for e in msg.embeddings]
    return EmbedResult(msg.model, embeddings, _usage(msg.usage), msg.request_id)


def classify_result(msg: inference_pb2.ClassifyResponse) -> ClassifyResult:
    results = [Classification(r.label, [(s.label, s.score) for s in r.scores]) for r in msg.results]
    return ClassifyResult(msg.model, results, _usage(msg.usage), msg.request_id)


def generate_result(msg: inference_pb2.GenerateResponse) -> GenerateResult:
    reason = _FINISH.get(msg.finish_reason, FinishReason.STOP)
    return GenerateResult(msg.model, msg.text, reason, _usage(msg.usage), msg.request_id)


def stream_event(msg: inference_pb2.GenerateStreamResponse) -> StreamEvent:
    if msg.WhichOneof("event") == "delta":
        return TextDelta(msg.delta, msg.output_tokens)
    return generate_result(msg.final)


def _when(m: models_pb2.ModelInfo, name: str) -> datetime.datetime | None:
    if not m.HasField(name):
        return None
    stamp: Any = getattr(m, name)
    moment: datetime.datetime = stamp.ToDatetime(tzinfo=datetime.UTC)
    return moment


def models_result(msg: models_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            m.id,
            _TASK[m.task],
            m.dimensions,
            m.max_input_tokens,
            m.ready,
            version=m.version,
            targets=tuple((t.model, t.weight) for t in m.targets),
            deprecated=_when(m, "deprecated"),
            sunset=_when(m, "sunset"),
            replacement=m.replacement,
        )
        for m in msg.models
    ]


def _moment(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def credits_result(msg: usage_pb2.GetCreditsResponse) -> CreditBalance:
    grants = [
        CreditGrant(
            g.id,
            g.kind,
            Decimal(g.amount),
            Decimal(g.used),
            Decimal(g.held),
            Decimal(g.remaining),
            g.priority,
            _moment(g.granted_at),
            _moment(g.expires_at) if g.expires_at else None,
            g.status,
        )
        for g in msg.grants
    ]
    return CreditBalance(msg.partner_id, msg.currency, msg.prepaid, Decimal(msg.balance), Decimal(msg.held), grants)


def usage_result(msg: usage_pb2.GetUsageResponse) -> UsageReport:
    rows = [UsageRow(r.day, r.model, r.operation, r.requests, r.input_tokens, r.output_tokens) for r in msg.rows]
    return UsageReport(msg.partner_id, msg.start_day, msg.end_day, rows)
