"""Domain errors and the one table that maps each to a gRPC code, an HTTP status and an error type.

Both front doors use ``describe()``; neither has its own mapping. Anything that is not a ``ServingError``
is a bug and maps to INTERNAL / 500.
"""

from __future__ import annotations

from dataclasses import dataclass


class ServingError(Exception):
    """Base of every error a partner may see. ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


class InvalidInput(ServingError):
    pass


class ContextLengthExceeded(InvalidInput):
    """An input has more tokens than the model (or the gateway's limit) accepts."""


class UnsupportedParameter(InvalidInput):
    """A field of an OpenAI-compatible body asks for a feature this API does not have (e.g. ``tools``)."""


class UnsupportedValue(InvalidInput):
    """A field this API knows, at a value it cannot honour (e.g. ``n`` > 1)."""


class PayloadTooLarge(ServingError):
    pass


class Unauthenticated(ServingError):
    pass


class PermissionDenied(ServingError):
    pass


class CredentialsMissing(Unauthenticated):
    """No credential at all (RFC 6750: the challenge then names no error)."""


class InsufficientScope(PermissionDenied):
    """A valid credential whose scopes do not include the operation's (RFC 6750's ``insufficient_scope``)."""

    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message, param="scope")
        self.scope = scope


class NotFound(ServingError):
    pass


class ModelNotFound(NotFound):
    pass


class ModelRetired(ServingError):
    """The model or alias called is past its sunset; ``replacement`` names what to call instead (None: nothing)."""

    def __init__(self, message: str, *, replacement: str | None) -> None:
        super().__init__(message, param="model")
        self.replacement = replacement


class AlreadyExists(ServingError):
    pass


class RouteNotFound(ServingError):
    pass


class IdempotencyKeyReused(ServingError):
    """The idempotency key was used before with a different request body."""


class RequestInProgress(ServingError):
    """A request with this idempotency key is still running; retry after it finished to get its outcome."""


class QuotaExceeded(ServingError):
    rate_limits: object | None = None  # the quota state to report in headers (a quota.limiter.RateLimits)


class InsufficientCredit(QuotaExceeded):
    """A prepaid partner's credit balance cannot cover a request's maximum cost (HTTP 402); ``balance`` and
    ``required`` are decimal strings in ``currency``."""

    def __init__(self, message: str, *, balance: str, required: str, currency: str) -> None:
        super().__init__(message, param="balance")
        self.balance, self.required, self.currency = balance, required, currency


class Overloaded(ServingError):
    pass


class Unavailable(ServingError):
    pass


class DeadlineExceeded(ServingError):
    pass


class Cancelled(ServingError):
    pass


@dataclass(frozen=True)
class ErrorKind:
    grpc_code: str  # a grpc.StatusCode member name; only the gRPC front door imports grpc
    http_status: int
    type: str  # the "type" of the HTTP error body (OpenAI style)
    code: str  # the "code" of the HTTP error body
    openai_code: str = ""  # the "code" on the OpenAI-compatible routes, where OpenAI's name differs from ``code``


INTERNAL = ErrorKind("INTERNAL", 500, "server_error", "internal_error")

ERROR_TABLE: dict[type[ServingError], ErrorKind] = {
    InvalidInput: ErrorKind("INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_argument"),
    ContextLengthExceeded: ErrorKind(
        "INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_argument", "context_length_exceeded"
    ),
    UnsupportedParameter: ErrorKind("INVALID_ARGUMENT", 400, "invalid_request_error", "unsupported_parameter"),
    UnsupportedValue: ErrorKind("INVALID_ARGUMENT", 400, "invalid_request_error", "unsupported_value"),
    PayloadTooLarge: ErrorKind("INVALID_ARGUMENT", 413, "invalid_request_error", "payload_too_large"),
    Unauthenticated: ErrorKind("UNAUTHENTICATED", 401, "authentication_error", "invalid_api_key"),
    PermissionDenied: ErrorKind("PERMISSION_DENIED", 403, "permission_error", "permission_denied"),
    InsufficientScope: ErrorKind("PERMISSION_DENIED", 403, "permission_error", "insufficient_scope"),
    NotFound: ErrorKind("NOT_FOUND", 404, "invalid_request_error", "not_found"),
    ModelNotFound: ErrorKind("NOT_FOUND", 404, "invalid_request_error", "model_not_found"),
    ModelRetired: ErrorKind("FAILED_PRECONDITION", 410, "invalid_request_error", "model_sunset"),
    AlreadyExists: ErrorKind("ALREADY_EXISTS", 409, "invalid_request_error", "request_id_reused"),
    RouteNotFound: ErrorKind("UNIMPLEMENTED", 404, "invalid_request_error", "not_found"),
    IdempotencyKeyReused: ErrorKind("FAILED_PRECONDITION", 422, "invalid_request_error", "idempotency_key_reused"),
    RequestInProgress: ErrorKind("ABORTED", 409, "invalid_request_error", "request_in_progress"),
    QuotaExceeded: ErrorKind("RESOURCE_EXHAUSTED", 429, "rate_limit_error", "quota_exceeded", "rate_limit_exceeded"),
    InsufficientCredit: ErrorKind("RESOURCE_EXHAUSTED", 402, "insufficient_quota", "insufficient_quota"),
    Overloaded: ErrorKind("UNAVAILABLE", 503, "overloaded_error", "overloaded"),
    Unavailable: ErrorKind("UNAVAILABLE", 503, "server_error", "unavailable"),
    DeadlineExceeded: ErrorKind("DEADLINE_EXCEEDED", 504, "timeout_error", "deadline_exceeded"),
    Cancelled: ErrorKind("CANCELLED", 499, "cancelled_error", "cancelled"),
}


def describe(error: BaseException) -> ErrorKind:
    """The kind of an error; an unknown exception is INTERNAL (a bug, never a 4xx)."""
    if isinstance(error, ServingError):
        for cls in type(error).__mro__:
            kind = ERROR_TABLE.get(cls)
            if kind is not None:
                return kind
    return INTERNAL


# Quota limits that waiting a minute does not lift: the monthly budget, a request larger than a minute's tokens,
# and a prepaid balance too small for the request.
NOT_RETRYABLE_QUOTA = frozenset({"monthly_tokens", "tokens_request", "balance"})


def openai_type_code(error: BaseException) -> tuple[str, str]:
    """The error body's ``type`` and ``code`` on the OpenAI-compatible routes: OpenAI's names where they differ."""
    kind = describe(error)
    if isinstance(error, QuotaExceeded) and error.param == "monthly_tokens":
        return "insufficient_quota", "insufficient_quota"  # OpenAI's name for a used-up budget
    return kind.type, kind.openai_code or kind.code


def retryable(error: BaseException) -> bool:
    """Whether the same request can pass after its ``retry_after_s``: not when a wait does not lift the limit."""
    return not (isinstance(error, QuotaExceeded) and error.param in NOT_RETRYABLE_QUOTA)


def public_message(error: BaseException) -> str:
    """What a partner sees: the domain message, or a generic line for bugs (details stay in logs)."""
    if isinstance(error, ServingError):
        return error.message
    return "internal error; the request id identifies it in the server logs"
