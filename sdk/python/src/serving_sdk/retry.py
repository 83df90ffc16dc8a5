"""When to retry a failed call, and after how long. Shared by the sync and async clients."""

from __future__ import annotations

import random
from dataclasses import dataclass

from serving_sdk.errors import ApiError

# UNAVAILABLE: the gateway is starting, draining, or lost a dependency; nothing ran or was billed. ABORTED with
# request_in_progress: an earlier attempt with the same idempotency key is still running; the retry gets its outcome.
_RETRYABLE = frozenset({("UNAVAILABLE", ""), ("ABORTED", "request_in_progress")})


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` counts the first try. The wait is exponential backoff with jitter, never shorter than the
    gateway's ``RetryInfo`` delay; a retry that could not start before the call's deadline is not made."""

    attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryPolicy needs attempts >= 1 and 0 <= initial_backoff_s <= max_backoff_s")

    def delay_before_retry(self, attempt: int, error: ApiError, remaining_s: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (0-based ``attempt`` just failed), or None: give up."""
        retryable = (error.code, "") in _RETRYABLE or (error.code, error.reason) in _RETRYABLE
        if not retryable or attempt + 1 >= self.attempts:
            return None
        backoff = min(self.max_backoff_s, self.initial_backoff_s * 2.0**attempt) * random.uniform(0.5, 1.0)
        delay = max(error.retry_after_s or 0.0, backoff)
        if remaining_s is not None and delay >= remaining_s:
            return None
        return delay


NO_RETRIES = RetryPolicy(attempts=1)
