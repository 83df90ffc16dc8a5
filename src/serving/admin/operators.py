"""Operators: named people (or automation) with a role, each holding a bearer token for the admin API.

Tokens look like API keys, ``sop_<12 hex token id>_<43 url-safe chars>`` (32 random bytes): the token id is a
lookup prefix, and only a SHA-256 digest of the whole token is stored (its entropy makes a slow hash
unnecessary), compared in constant time. A token is shown once, at creation.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from serving.partners.keys import digest, digest_matches
from serving.storage.database import Database, DuplicateRow

PREFIX = "sop"
_TOKEN_ID_BYTES = 6
_SECRET_BYTES = 32
# No ':' (``local:<user>`` names the CLI's local owner) and not the legacy token's actor name: an audit record's
# actor always says which kind of credential made the change.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
RESERVED_NAMES = frozenset({"admin-token"})


class Role(IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    VIEWER = 1  # reads every admin route, the audit log included
    OPERATOR = 2  # partners, plans, API keys, OAuth clients
    OWNER = 3  # everything, operators and signing-key rotation included

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, raw: str) -> Role:
        try:
            return cls[raw.strip().upper()]
        except KeyError:
            raise OperatorError(f"unknown role {raw!r}; the roles are: viewer, operator, owner") from None


class OperatorError(ValueError):
    """An invalid operator name or role, or a name already taken."""


class OperatorNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Operator:
    name: str
    role: Role
    created_at: float
    disabled: bool

    def public(self) -> dict[str, object]:
        """What admin routes and the audit log show: never the token or its digest."""
        return {"name": self.name, "role": self.role.label, "created_at": self.created_at, "disabled": self.disabled}


def _token_id(token: str) -> str | None:
    """The token id of a string shaped like an operator token, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[1]) != 2 * _TOKEN_ID_BYTES or len(parts[2]) < 40:
        return None
    return parts[1]


_COLUMNS = "name, role, created_at, disabled_at"


def _operator(row: tuple[object, ...]) -> Operator:
    return Operator(str(row[0]), Role.parse(str(row[1])), float(row[2]), row[3] is not None)  # type: ignore[arg-type]


class OperatorStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db  # migrated by PartnerStore (same database)
        self._clock = clock

    def create(self, name: str, role: Role) -> tuple[Operator, str]:
        """A new operator and its token (returned once, never stored)."""
        if not _NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise OperatorError(
                f"invalid operator name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-' (not admin-token)"
            )
        if self.db.one("SELECT name FROM operators WHERE name = ?", (name,)) is not None:
            raise OperatorError(f"an operator named {name!r} already exists")
        token_id = secrets.token_hex(_TOKEN_ID_BYTES)
        token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        operator = Operator(name, role, self._clock(), False)
        try:
            self.db.execute(
                "INSERT INTO operators (name, token_id, digest, role, created_at) VALUES (?, ?, ?, ?, ?)",
                (name, token_id, digest(token), role.label, operator.created_at),
            )
        except DuplicateRow as exc:  # created by another writer since the check
            raise OperatorError(f"an operator named {name!r} already exists") from exc
        return operator, token

    def get(self, name: str) -> Operator:
        row = self.db.one(f"SELECT {_COLUMNS} FROM operators WHERE name = ?", (name,))
        if row is None:
            raise OperatorNotFound(f"no operator named {name!r}")
        return _operator(row)

    def list(self) -> list[Operator]:
        return [_operator(row) for row in self.db.query(f"SELECT {_COLUMNS} FROM operators ORDER BY name")]

    def set_role(self, name: str, role: Role) -> Operator:
        if not self.db.execute("UPDATE operators SET role = ? WHERE name = ?", (role.label, name)):
            raise OperatorNotFound(f"no operator named {name!r}")
        return self.get(name)

    def set_disabled(self, name: str, disabled: bool) -> Operator:
        """A disabled operator's token is refused until the operator is enabled again."""
        disabled_at = self._clock() if disabled else None
        if not self.db.execute("UPDATE operators SET disabled_at = ? WHERE name = ?", (disabled_at, name)):
            raise OperatorNotFound(f"no operator named {name!r}")
        return self.get(name)

    def authenticate(self, token: str) -> Operator | None:
        """The enabled operator holding this token, else None."""
        token_id = _token_id(token)
        if token_id is None:
            return None
        row = self.db.one(f"SELECT {_COLUMNS}, digest FROM operators WHERE token_id = ?", (token_id,))
        if row is None or not digest_matches(token, str(row[4])):
            return None
        operator = _operator(row)
        return None if operator.disabled else operator
