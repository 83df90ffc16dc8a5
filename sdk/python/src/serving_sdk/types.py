"""The typed results the clients return (plain frozen dataclasses, no protobuf)."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass
from decimal import Decimal


class FinishReason(enum.StrEnum):
    STOP = "stop"  # the model ended, or a stop string was reached
    LENGTH = "length"  # max_tokens was reached
    CANCELLED = "cancelled"  # the call was cancelled; billed for what was sent


class Task(enum.StrEnum):
    EMBED = "embed"
    CLASSIFY = "classify"
    GENERATE = "generate"


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class EmbedResult:
    model: str
    embeddings: list[list[float]]  # one unit vector per text, in order
    usage: Usage
    request_id: str = ""


@dataclass(frozen=True)
class Classification:
    label: str  # the best label
    scores: list[tuple[str, float]]  # every label with its score, best first; they sum to 1


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    results: list[Classification]  # one per text, in order
    usage: Usage
    request_id: str = ""


@dataclass(frozen=True)
class GenerateResult:
    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    request_id: str = ""


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed text. ``output_tokens``: the tokens sent so far, this piece included (what a stop now
    is billed)."""

    text: str
    output_tokens: int = 0


StreamEvent = TextDelta | GenerateResult  # a stream yields TextDelta pieces, then one GenerateResult


@dataclass(frozen=True)
class ModelInfo:
    """A model (``minilm-l6``, or a version ``minilm-l6@2026-11``) or an alias (``targets`` set)."""

    id: str
    task: Task
    dimensions: int  # embedding width for embed models, 0 otherwise
    max_input_tokens: int
    ready: bool  # False once past its sunset
    version: str = ""  # "2026-11" of "minilm-l6@2026-11"
    targets: tuple[tuple[str, int], ...] = ()  # an alias: (model id, weight) of each model it routes to
    deprecated: datetime.datetime | None = None  # UTC; calls also carry `deprecation` metadata
    sunset: datetime.datetime | None = None  # UTC; from then on calls fail with FAILED_PRECONDITION
    replacement: str = ""  # what to call instead


@dataclass(frozen=True)
class UsageRow:
    day: str
    model: str
    operation: str
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class UsageReport:
    partner_id: str
    start_day: str
    end_day: str
    rows: list[UsageRow]


@dataclass(frozen=True)
class CreditGrant:
    """One credit grant (or, on a prepaid plan, the month's allowance); money in the balance's currency."""

    id: str
    kind: str  # purchased | promotional | allowance
    amount: Decimal
    used: Decimal
    held: Decimal  # by requests in flight (prepaid plans)
    remaining: Decimal
    priority: int  # lower is drawn first
    granted_at: datetime.datetime
    expires_at: datetime.datetime | None
    status: str  # active | expired | scheduled


@dataclass(frozen=True)
class CreditBalance:
    partner_id: str
    currency: str
    prepaid: bool  # every request holds its maximum cost from the balance
    balance: Decimal  # what active grants have left
    held: Decimal
    grants: list[CreditGrant]
