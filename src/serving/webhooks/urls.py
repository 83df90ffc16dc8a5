"""What an endpoint URL and its thresholds must be, checked at the edge before anything is stored."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from serving.errors import InvalidInput

MAX_URL_LENGTH = 2048
MAX_THRESHOLDS = 10
MIN_PERCENT, MAX_PERCENT = 1, 1000
LOOPBACK_NAMES = frozenset({"localhost"})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost`` (a name is not resolved: only this one counts)."""
    ip = _ip(host)
    return ip.is_loopback if ip is not None else host.rstrip(".") in LOOPBACK_NAMES


def _internal(host: str) -> bool:
    """An address literal no partner endpoint should have: private, shared, link-local (cloud metadata), reserved,
    multicast."""
    ip = _ip(host)
    if ip is None:
        return False
    return not ip.is_global or ip.is_multicast


def validate_url(raw: str, allow_loopback: bool = True) -> str:
    """An absolute ``https://`` URL; plain ``http://`` only to loopback (development and tests), and loopback at all
    only when ``allow_loopback``. Raises ``InvalidInput`` naming the problem."""
    url = raw.strip()
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"url is longer than {MAX_URL_LENGTH} characters", param="url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535 or not a number
    except ValueError as exc:
        raise InvalidInput(f"url is not a valid URL: {exc}", param="url") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("https", "http") or not host:
        raise InvalidInput("url must be an absolute https:// URL, e.g. https://example.com/hooks/usage", param="url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("url must not carry credentials (user:password@); verify the signature instead", param="url")
    if parts.fragment:
        raise InvalidInput("url must not have a #fragment", param="url")
    loopback = is_loopback(host)
    if loopback and not allow_loopback:
        raise InvalidInput("url must not point at a loopback address on this platform", param="url")
    if scheme == "http" and not loopback:
        raise InvalidInput(
            "url must use https; plain http is accepted only for loopback (127.0.0.1, localhost, [::1])", param="url"
        )
    if not loopback and _internal(host):
        raise InvalidInput(f"url must not point at a private or reserved address ({host})", param="url")
    return url


def validate_thresholds(values: list[int]) -> tuple[int, ...]:
    """Percentages of the budget, 1..1000, at most ``MAX_THRESHOLDS``; sorted, duplicates dropped."""
    if not values:
        raise InvalidInput("thresholds must name at least one percentage, e.g. [50, 80, 100]", param="thresholds")
    unique = sorted(set(values))
    if len(unique) > MAX_THRESHOLDS:
        raise InvalidInput(f"thresholds: at most {MAX_THRESHOLDS} percentages per endpoint", param="thresholds")
    for value in unique:
        if not MIN_PERCENT <= value <= MAX_PERCENT:
            raise InvalidInput(
                f"thresholds are percentages in {MIN_PERCENT}..{MAX_PERCENT}; got {value}", param="thresholds"
            )
    return tuple(unique)
