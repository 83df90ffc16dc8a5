"""Retries with exponential backoff for reads from the gateways and from Prometheus."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

T = TypeVar("T")
log = logging.getLogger("billing.retry")


class SourceError(RuntimeError):
    """A usage source could not be read (after retries): unreachable, an error answer, or a broken payload."""


class RetryableError(SourceError):
    """A failure worth another attempt (transport error, 5xx, 429, a Prometheus 'unavailable' answer)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.2  # doubles per attempt

    def run(self, what: str, call: Callable[[], T], on_attempt: Callable[[bool], None] | None = None) -> T:
        """Calls ``call`` until it succeeds, at most ``attempts`` times; raises the last ``SourceError``.

        ``on_attempt(ok)`` is told the outcome of every attempt (for the scrape counters)."""
        pause = threading.Event()  # never set: an interruptible, clock-free wait between attempts
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                result = call()
            except httpx.TransportError as exc:
                error: SourceError = RetryableError(f"{what}: {type(exc).__name__}: {exc}")
            except httpx.HTTPStatusError as exc:
                status = exc.response.status_code
                text = f"{what}: HTTP {status}: {exc.response.text[:200]}"
                error = RetryableError(text) if status >= 500 or status == 429 else SourceError(text)
            except RetryableError as exc:
                error = exc
            except SourceError as exc:
                if on_attempt:
                    on_attempt(False)
                raise exc
            else:
                if on_attempt:
                    on_attempt(True)
                return result
            if on_attempt:
                on_attempt(False)
            log.warning("%s (attempt %d of %d)", error, attempt, self.attempts)
            if attempt == self.attempts or not isinstance(error, RetryableError):
                raise error
            pause.wait(delay)
            delay *= 2
        raise AssertionError("unreachable")
