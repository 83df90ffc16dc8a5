"""Response headers / metadata both front doors send: the request id, OpenAI-style rate-limit fields, and a
deprecated model's ``Deprecation`` (RFC 9745), ``Sunset`` (RFC 8594) and successor ``Link`` (RFC 5829)."""

from __future__ import annotations

import email.utils
import math
import urllib.parse

from serving.gateway.core import ResponseMeta
from serving.models.lifecycle import Lifecycle


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
    if meta.lifecycle is not None:
        pairs += lifecycle_pairs(meta.lifecycle)
    return pairs


def lifecycle_pairs(lifecycle: Lifecycle) -> list[tuple[str, str]]:
    """``deprecation: @<Unix seconds>`` (an RFC 9651 date), ``sunset: <IMF-fixdate>``, and a ``link`` to the
    replacement's model card (``GET /v1/models/{id}`` on the HTTP port) as its successor version."""
    pairs: list[tuple[str, str]] = []
    if lifecycle.deprecated is not None:
        pairs.append(("deprecation", f"@{int(lifecycle.deprecated.timestamp())}"))
    if lifecycle.sunset is not None:
        pairs.append(("sunset", email.utils.format_datetime(lifecycle.sunset, usegmt=True)))
    if lifecycle.replacement:
        path = urllib.parse.quote(lifecycle.replacement, safe="/@:")
        pairs.append(("link", f'</v1/models/{path}>; rel="successor-version"'))
    return pairs


def retry_after(seconds: float) -> str:
    """Whole seconds, rounded up (HTTP Retry-After has no fractions)."""
    return str(max(1, math.ceil(seconds)))


def retry_after_ms(seconds: float) -> str:
    """Milliseconds, rounded up, at least 1 (``retry-after-ms``, which OpenAI's clients prefer to ``retry-after``)."""
    return str(max(1, math.ceil(seconds * 1000)))
