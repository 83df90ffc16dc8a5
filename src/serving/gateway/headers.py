"""Response headers / metadata both front doors send: the request id and OpenAI-style rate-limit fields."""

from __future__ import annotations

import math

from serving.gateway.core import ResponseMeta


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}s"


def response_pairs(meta: ResponseMeta) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if meta.request_id:
        pairs.append(("x-request-id", meta.request_id))
    if meta.replayed:
        pairs.append(("idempotent-replayed", "true"))  # the stored outcome of an earlier call with this key
    limits = meta.rate_limits
    if limits is not None:
        if limits.limit_requests:
            pairs += [
                ("x-ratelimit-limit-requests", str(limits.limit_requests)),
                ("x-ratelimit-remaining-requests", str(limits.remaining_requests)),
                ("x-ratelimit-reset-requests", _seconds(limits.reset_requests_s)),
            ]
        if limits.limit_tokens:
            pairs += [
                ("x-ratelimit-limit-tokens", str(limits.limit_tokens)),
                ("x-ratelimit-remaining-tokens", str(limits.remaining_tokens)),
                ("x-ratelimit-reset-tokens", _seconds(limits.reset_tokens_s)),
            ]
    return pairs


def retry_after(seconds: float) -> str:
    """Whole seconds, rounded up (HTTP Retry-After has no fractions)."""
    return str(max(1, math.ceil(seconds)))


def retry_after_ms(seconds: float) -> str:
    """Milliseconds, rounded up, at least 1 (``retry-after-ms``, which OpenAI's clients prefer to ``retry-after``)."""
    return str(max(1, math.ceil(seconds * 1000)))
