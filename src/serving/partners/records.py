"""A partner as stored (its own module: the partner store and the OAuth client store both build it)."""

from __future__ import annotations

from dataclasses import dataclass


class PartnerNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Partner:
    id: str
    name: str
    plan: str
    disabled: bool
