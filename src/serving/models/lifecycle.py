"""What the registry says about a model's or an alias's life: versioned ids, deprecation, sunset, replacement.

A versioned id is an id with one ``@``: ``minilm-l6@2026-11`` is version ``2026-11`` of ``minilm-l6``. Dates are
TOML dates (midnight UTC) or date-times with an offset; they are kept as aware UTC datetimes. Whether a sunset has
passed is asked with a time the caller passes in (the gateway's clock), never read here.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

LIFECYCLE_KEYS = ("deprecated", "sunset", "replacement")


class RegistryError(ValueError):
    """The registry file is malformed; raised at startup."""


@dataclass(frozen=True)
class Lifecycle:
    deprecated: datetime.datetime | None = None  # from then on deprecated (RFC 9745; may lie in the future)
    sunset: datetime.datetime | None = None  # from then on calls are refused (RFC 8594)
    replacement: str | None = None  # the model or alias to call instead

    @property
    def announced(self) -> bool:
        """Whether responses carry ``Deprecation`` / ``Sunset``."""
        return self.deprecated is not None or self.sunset is not None

    def retired(self, now: float) -> bool:
        """Whether the sunset has come at ``now`` (Unix seconds)."""
        return self.sunset is not None and now >= self.sunset.timestamp()


def split_version(model_id: str) -> tuple[str, str]:
    """``("minilm-l6", "2026-11")`` for ``minilm-l6@2026-11``; the version is empty for an unversioned id."""
    base, _, version = model_id.partition("@")
    return base, version


def check_id(entry_id: str, where: str) -> None:
    if not entry_id.strip() or entry_id != entry_id.strip():
        raise RegistryError(f"{where}: the id must be a non-empty name without surrounding spaces; got {entry_id!r}")
    base, version = split_version(entry_id)
    if "@" in entry_id and (not base or not version or "@" in version):
        raise RegistryError(f"{where}: a versioned id is <name>@<version> with one '@'; got {entry_id!r}")


def _moment(raw: Any, where: str) -> datetime.datetime:
    """A TOML date (midnight UTC), an offset date-time, or the same as an ISO 8601 string → aware UTC."""
    value = raw
    if isinstance(raw, str):
        try:
            timed = "T" in raw or " " in raw
            value = datetime.datetime.fromisoformat(raw) if timed else datetime.date.fromisoformat(raw)
        except ValueError as exc:
            raise RegistryError(f"{where}: not an ISO 8601 date or date-time: {raw!r}") from exc
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise RegistryError(f"{where}: a date-time needs an offset (e.g. 2027-01-01T00:00:00Z); got {raw!r}")
        return value.astimezone(datetime.UTC)
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
    raise RegistryError(f"{where}: must be a date (2027-01-01) or a date-time with an offset; got {raw!r}")


def parse_lifecycle(raw: dict[str, Any], where: str) -> Lifecycle:
    """The ``deprecated`` / ``sunset`` / ``replacement`` keys of a ``[[models]]`` or ``[[aliases]]`` table."""
    deprecated = None if raw.get("deprecated") is None else _moment(raw["deprecated"], f"{where}.deprecated")
    sunset = None if raw.get("sunset") is None else _moment(raw["sunset"], f"{where}.sunset")
    replacement = raw.get("replacement")
    if replacement is not None and (not isinstance(replacement, str) or not replacement):
        raise RegistryError(f"{where}.replacement must be a model or alias id; got {replacement!r}")
    if deprecated is not None and sunset is not None and sunset < deprecated:
        raise RegistryError(
            f"{where}: sunset {sunset.isoformat()} comes before deprecated {deprecated.isoformat()};"
            " a model is deprecated first and retired at its sunset"
        )
    lifecycle = Lifecycle(deprecated, sunset, replacement)
    if replacement is not None and not lifecycle.announced:
        raise RegistryError(f"{where}.replacement is set but neither deprecated nor sunset: set one of them too")
    return lifecycle


def check_replacements(lifecycles: dict[str, Lifecycle]) -> None:
    """Every replacement names another known model or alias."""
    for entry_id, lifecycle in lifecycles.items():
        replacement = lifecycle.replacement
        if replacement is None:
            continue
        if replacement == entry_id:
            raise RegistryError(f"{entry_id!r}: replacement names itself")
        if replacement not in lifecycles:
            raise RegistryError(
                f"{entry_id!r}: replacement {replacement!r} is neither a model nor an alias of the registry"
            )
