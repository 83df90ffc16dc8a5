"""Delivery signatures: ``Serving-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.

The timestamp is part of what is signed, so a captured delivery cannot be replayed later than the receiver's
tolerance; the body is signed byte for byte as sent. A receiver accepts any ``v1`` that matches (room for two
secrets during a rotation) and deduplicates by ``Serving-Event-Id``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SIGNATURE_HEADER = "Serving-Signature"
EVENT_ID_HEADER = "Serving-Event-Id"
DELIVERY_ID_HEADER = "Serving-Delivery-Id"
ATTEMPT_HEADER = "Serving-Delivery-Attempt"
DEFAULT_TOLERANCE_S = 300.0
SECRET_PREFIX = "whsec_"


class SignatureError(ValueError):
    """The header is malformed, too old or too new, or no signature in it matches."""


def new_secret() -> str:
    """A signing secret: 256 random bits. The whole string (prefix included) is the HMAC key."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Serving-Signature`` header value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Checks a ``Serving-Signature`` header against the raw body; returns its timestamp or raises
    ``SignatureError``."""
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed signature header item {item!r}")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError as exc:
                raise SignatureError(f"the timestamp {value!r} is not an integer") from exc
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("the signature header needs t=<timestamp> and at least one v1=<signature>")
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"the timestamp is {now - timestamp:.0f} s away from now (tolerance {tolerance_s:.0f} s)")
    expected = signature(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureError("no v1 signature matches this secret and body")
    return timestamp
