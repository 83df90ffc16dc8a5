"""Internal request and response types shared by the front doors, the core and the model layer."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field

from serving.plans import Plan


class Task(enum.StrEnum):
    EMBED = "embed"
    CLASSIFY = "classify"
    GENERATE = "generate"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Caller:
    """An authenticated partner; the key id is the key's public prefix, never the secret."""

    partner_id: str
    key_id: str  # an API key's id, or the OAuth client id of an access token (usage is metered to it)
    plan: Plan
    scopes: frozenset[str] | None = None  # None: every scope (an API key issued without scopes)


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    texts: list[str]
    request_id: str = ""


@dataclass(frozen=True)
class EmbedResult:
    model: str
    embeddings: list[list[float]]
    usage: Usage
    request_id: str = ""


@dataclass(frozen=True)
class ClassifyRequest:
    model: str
    texts: list[str]
    labels: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass(frozen=True)
class Classification:
    label: str
    scores: list[tuple[str, float]]  # every label, best first


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    results: list[Classification]
    usage: Usage
    request_id: str = ""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""


@dataclass(frozen=True)
class GenerateResult:
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    request_id: str = ""
    created: int = 0  # Unix time the request started (OpenAI's ``created``; the same when replayed)


@dataclass(frozen=True)
class TextDelta:
    text: str
    output_tokens: int = 0  # output tokens whose text has been sent, this piece included (what a stop now bills)


StreamEvent = TextDelta | GenerateResult


@dataclass(frozen=True)
class ModelInfo:
    id: str
    task: Task
    dimensions: int
    max_input_tokens: int
    ready: bool  # callable now (False once past its sunset)
    version: str = ""  # "2026-11" of a versioned id "minilm-l6@2026-11"
    targets: tuple[tuple[str, int], ...] = ()  # an alias: (model id, weight) of each model it routes to
    deprecated: datetime.datetime | None = None
    sunset: datetime.datetime | None = None
    replacement: str = ""  # what to call instead of a deprecated model or alias
