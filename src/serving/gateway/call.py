"""One request's bookkeeping as the core carries it from its start to its one finish."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from serving.domain import Caller, Usage
from serving.errors import Overloaded, QuotaExceeded, ServingError, Unavailable, describe
from serving.idempotency.codec import Outcome
from serving.quota.limiter import Reservation

log = logging.getLogger("serving.gateway")


@dataclass
class Call:
    """One request's bookkeeping; finished exactly once."""

    operation: str
    model: str
    started: float = field(default_factory=time.time)
    started_perf: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    request_id: str = ""
    client_request_id: bool = False  # the id is the caller's idempotency key
    fingerprint: str = ""
    claimed: bool = False  # this call holds its idempotency key
    retry_scoped: bool = False  # its key covers its own retries only: the outcome is kept briefly
    result: Outcome | None = None
    error: BaseException | None = None
    delivered: bool = False  # a stream handed text to the front door
    reservation: Reservation | None = None
    queued: bool = False
    entered: bool = False
    queue_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    status: str = "ok"
    quota_reason: str = ""
    peer: str | None = None
    correlation_id: str | None = None
    span: Span | None = None
    finished: bool = False

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.status = status_of(exc)
        if isinstance(exc, QuotaExceeded):
            self.quota_reason = exc.param or "quota"

    def refused_by_model(self) -> bool:
        """The model turned it away before producing anything (at capacity, or its replica is gone)."""
        return isinstance(self.error, Overloaded | Unavailable) and self.result is None and not self.delivered


def status_of(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    if isinstance(exc, TimeoutError):
        return "deadline_exceeded"
    if not isinstance(exc, ServingError):
        log.exception("unexpected error", exc_info=exc)
    return describe(exc).grpc_code.lower()
