"""Errors: one exception type carrying the gRPC status and the google.rpc details the gateway sends."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_KEY = "grpc-status-details-bin"


class ConfigurationError(ValueError):
    """The client cannot be built as asked (no API key, an unreadable CA file, ...)."""


class ApiError(Exception):
    """A call failed.

    ``code``: the gRPC status name (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, ...).
    ``reason``: the gateway's error code from ``ErrorInfo`` (``rate_limited``, ``model_not_found``, ...) or "".
    ``field``: the request field at fault (``BadRequest``), or None.
    ``subject``: the quota that refused the call (``QuotaFailure``), or None.
    ``retry_after_s``: how long the gateway asked to wait (``RetryInfo``), or None.
    ``request_id``: the call's idempotency key: retrying with it never runs or bills the call twice.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        reason: str = "",
        field: str | None = None,
        subject: str | None = None,
        retry_after_s: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field
        self.subject = subject
        self.retry_after_s = retry_after_s
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:  # picklable (multiprocessing, process pools) with every field
        fields = {"reason": self.reason, "field": self.field, "subject": self.subject}
        more = {"retry_after_s": self.retry_after_s, "request_id": self.request_id}
        return (_rebuild, (self.code, self.message, fields | more))


def _rebuild(code: str, message: str, fields: dict[str, Any]) -> ApiError:
    return ApiError(code, message, **fields)


def _status(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _STATUS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def api_error(error: grpc.RpcError, request_id: str = "") -> ApiError:
    """The ApiError for a failed call, with every detail the gateway attached."""
    code = error.code() if hasattr(error, "code") else None
    reason, field, subject, retry_after = "", None, None, None
    status = _status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason.lower()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else field
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            subject = quota.violations[0].subject if quota.violations else None
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
    message = (error.details() if hasattr(error, "details") else None) or ""
    return ApiError(
        code.name if code is not None else "UNKNOWN",
        message,
        reason=reason,
        field=field,
        subject=subject,
        retry_after_s=retry_after,
        request_id=request_id,
    )
