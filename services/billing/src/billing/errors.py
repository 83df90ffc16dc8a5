"""The one table of billing's failures: HTTP status, error code and CLI exit code for each."""

from __future__ import annotations

from dataclasses import dataclass

from billing.periods import PeriodError
from billing.retry import SourceError
from billing.service import PeriodIncomplete
from serving.commerce.pricebook import PricingError
from serving.storage.database import DatabaseUnavailable


@dataclass(frozen=True)
class ErrorKind:
    error: type[Exception]
    http_status: int
    code: str
    exit_code: int
    what: str  # how the CLI introduces the message


ERRORS: tuple[ErrorKind, ...] = (
    ErrorKind(PeriodError, 400, "invalid_period", 2, "invalid period"),
    ErrorKind(PeriodIncomplete, 409, "period_incomplete", 3, "period not complete"),
    ErrorKind(SourceError, 502, "source_unavailable", 4, "usage source failed"),
    ErrorKind(PricingError, 422, "pricing_error", 5, "pricing"),
    ErrorKind(DatabaseUnavailable, 503, "database_unavailable", 6, "database unreachable"),
)
BILLING_ERRORS = tuple(kind.error for kind in ERRORS)


def kind_of(exc: Exception) -> ErrorKind:
    return next(kind for kind in ERRORS if isinstance(exc, kind.error))
