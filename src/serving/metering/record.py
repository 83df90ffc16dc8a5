"""One usage record: what a partner is billed for one admitted request."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    partner_id: str
    key_id: str
    model: str
    operation: str
    input_tokens: int
    output_tokens: int
    status: str
    queue_ms: float
    latency_ms: float
    started_at: float
    finished_at: float

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.started_at))

    def row(self) -> tuple[Any, ...]:
        return (
            self.partner_id, self.request_id, self.key_id, self.model, self.operation, self.input_tokens,
            self.output_tokens, self.status, self.queue_ms, self.latency_ms, self.started_at, self.finished_at,
            self.day,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> UsageRecord:
        return cls(**json.loads(line))


INSERT_SQL = (
    "INSERT INTO usage_records (partner_id, request_id, key_id, model, operation, input_tokens, output_tokens,"
    " status, queue_ms, latency_ms, started_at, finished_at, day) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (partner_id, request_id) DO NOTHING"
)
