"""What an idempotency key stores: a request's fingerprint, and its outcome as bytes (JSON; vectors as base64
float32, so a replayed embedding is bit-identical to the original)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np

from serving.domain import (
    Classification,
    ClassifyResult,
    EmbedResult,
    FinishReason,
    GenerateResult,
    Usage,
)
from serving.errors import ERROR_TABLE, AlreadyExists, ServingError
from serving.idempotency.store import TOO_LARGE

Outcome = EmbedResult | ClassifyResult | GenerateResult | ServingError
_ERRORS = {cls.__name__: cls for cls in ERROR_TABLE}


def fingerprint(operation: str, request: Any) -> str:
    """A digest of what the request asks for: the operation and every request field except its key."""
    fields = {k: v for k, v in asdict(request).items() if k != "request_id"}
    canonical = json.dumps([operation, fields], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _vector(values: Any) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def encode(outcome: Outcome) -> bytes:
    body: dict[str, Any]
    if isinstance(outcome, ServingError):
        body = {"error": type(outcome).__name__, "message": outcome.message, "param": outcome.param}
    elif isinstance(outcome, EmbedResult):
        body = {"embed": [_vector(v) for v in outcome.embeddings]}
    elif isinstance(outcome, ClassifyResult):
        body = {"classify": [[c.label, c.scores] for c in outcome.results]}
    else:
        body = {"generate": outcome.text, "finish_reason": outcome.finish_reason.value, "created": outcome.created}
    if not isinstance(outcome, ServingError):
        body |= {"model": outcome.model, "usage": asdict(outcome.usage), "request_id": outcome.request_id}
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes, key: str) -> Outcome:
    """The stored outcome (an error comes back as the exception to raise)."""
    if data == TOO_LARGE:
        return AlreadyExists(
            f"idempotency key {key!r} was used by a request whose response was too large to keep for replay; it ran"
            " and was billed once; send a new key to run it again",
            param="request_id",
        )
    body = json.loads(data)
    if "error" in body:
        error: ServingError = _ERRORS[body["error"]](body["message"], param=body["param"])
        return error
    usage, model, request_id = Usage(**body["usage"]), body["model"], body["request_id"]
    if "embed" in body:
        vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4").tolist() for v in body["embed"]]
        return EmbedResult(model, vectors, usage, request_id)
    if "classify" in body:
        results = [Classification(label, [(lb, float(s)) for lb, s in scores]) for label, scores in body["classify"]]
        return ClassifyResult(model, results, usage, request_id)
    reason = FinishReason(body["finish_reason"])
    return GenerateResult(model, body["generate"], reason, usage, request_id, int(body["created"]))


R = TypeVar("R", EmbedResult, ClassifyResult, GenerateResult)


def expect_outcome(outcome: Outcome, kind: type[R]) -> R:
    """A replayed outcome of the operation's own result type (the fingerprint covers the operation)."""
    if not isinstance(outcome, kind):
        raise TypeError(f"stored outcome {type(outcome).__name__} where {kind.__name__} was expected")
    return outcome
