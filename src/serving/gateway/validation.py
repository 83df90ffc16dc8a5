"""Edge validation: every limit a request must meet, each failure naming the field to fix."""

from __future__ import annotations

import datetime
import re
import uuid

from serving.domain import GenerateRequest, SamplingParams
from serving.errors import ContextLengthExceeded, InvalidInput
from serving.models.codec import TextCodec
from serving.models.registry import ModelSpec
from serving.settings import Limits

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ROLES = frozenset({"system", "user", "assistant"})


def request_id(supplied: str) -> str:
    if not supplied:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(supplied):
        raise InvalidInput("request_id must be 1-128 characters of letters, digits and . _ : -", param="request_id")
    return supplied


def texts(values: list[str], limits: Limits, codec: TextCodec, spec: ModelSpec, field: str = "texts") -> int:
    """Checks the texts and returns their total token count."""
    if not values:
        raise InvalidInput(f"{field} must hold at least one text", param=field)
    if len(values) > limits.max_texts_per_call:
        raise InvalidInput(
            f"{field} holds {len(values)} texts; at most {limits.max_texts_per_call} per call", param=field
        )
    for i, text in enumerate(values):
        if not text.strip():
            raise InvalidInput(f"{field}[{i}] is empty", param=f"{field}[{i}]")
    counts = codec.count(values)
    cap = min(limits.max_text_tokens, spec.max_input_tokens)
    for i, count in enumerate(counts):
        if count > cap:
            raise ContextLengthExceeded(
                f"{field}[{i}] has {count} tokens; {spec.id} accepts at most {cap} (longer text is rejected,"
                " not truncated: split it)",
                param=f"{field}[{i}]",
            )
    return sum(counts)


def labels(values: list[str], spec: ModelSpec, limits: Limits) -> tuple[str, ...]:
    chosen = tuple(values) or spec.labels
    if not chosen:
        raise InvalidInput("labels must hold at least one candidate label", param="labels")
    if len(chosen) > limits.max_labels:
        raise InvalidInput(f"labels holds {len(chosen)}; at most {limits.max_labels}", param="labels")
    for i, label in enumerate(chosen):
        if not label.strip() or len(label) > 200:
            raise InvalidInput(f"labels[{i}] must be 1-200 characters", param=f"labels[{i}]")
    if len(set(chosen)) != len(chosen):
        raise InvalidInput("labels must be unique", param="labels")
    return chosen


def sampling(req: GenerateRequest, limits: Limits) -> SamplingParams:
    max_tokens = req.max_tokens or limits.default_output_tokens
    if not 1 <= max_tokens <= limits.max_output_tokens:
        raise InvalidInput(f"max_tokens must be 1-{limits.max_output_tokens}; got {max_tokens}", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidInput(f"temperature must be 0-2; got {temperature}", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidInput(f"top_p must be in (0, 1]; got {top_p}", param="top_p")
    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidInput(f"stop holds at most {limits.max_stop_sequences} strings", param="stop")
    for i, stop in enumerate(req.stop):
        if not stop or len(stop) > 64:
            raise InvalidInput(f"stop[{i}] must be 1-64 characters", param=f"stop[{i}]")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise InvalidInput("seed must be in 0..2^63-1", param="seed")
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(req.stop), seed=req.seed
    )


def prompt_ids(req: GenerateRequest, codec: TextCodec, spec: ModelSpec, limits: Limits) -> list[int]:
    if req.messages and req.prompt:
        raise InvalidInput("set either messages or prompt, not both", param="messages")
    if req.messages:
        for i, message in enumerate(req.messages):
            if message.role not in _ROLES:
                raise InvalidInput(
                    f"messages[{i}].role must be one of {sorted(_ROLES)}; got {message.role!r}",
                    param=f"messages[{i}].role",
                )
        if not any(m.content.strip() for m in req.messages if m.role == "user"):
            raise InvalidInput("messages needs a user message with content", param="messages")
        ids = codec.encode_chat(req.messages)
    elif req.prompt.strip():
        ids = codec.encode_prompt(req.prompt)
    else:
        raise InvalidInput("messages or prompt is required", param="messages")
    cap = min(limits.max_prompt_tokens, spec.max_input_tokens)
    if len(ids) > cap:
        field = "messages" if req.messages else "prompt"
        raise ContextLengthExceeded(f"{field} has {len(ids)} tokens; {spec.id} accepts at most {cap}", param=field)
    return ids


def day_range(start: str, end: str, today: datetime.date) -> tuple[str, str]:
    """Inclusive UTC days; defaults are the first of the current month and today."""
    try:
        first = datetime.date.fromisoformat(start) if start else today.replace(day=1)
    except ValueError as exc:
        raise InvalidInput(f"start_day must be YYYY-MM-DD; got {start!r}", param="start_day") from exc
    try:
        last = datetime.date.fromisoformat(end) if end else today
    except ValueError as exc:
        raise InvalidInput(f"end_day must be YYYY-MM-DD; got {end!r}", param="end_day") from exc
    if last < first:
        raise InvalidInput("end_day is before start_day", param="end_day")
    if (last - first).days > 366:
        raise InvalidInput("ask for at most 366 days at a time", param="end_day")
    return first.isoformat(), last.isoformat()
