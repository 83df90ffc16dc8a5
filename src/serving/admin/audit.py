"""The audit log: one row per admin change, appended in the same transaction as the change, never updated or
deleted (no code path does; on PostgreSQL, grant the gateway's role only INSERT and SELECT on ``audit_log``).

A row names who (the operator, or ``admin-token``, or ``local:<OS user>`` for the CLI without a token) and with
which role, what (an action from ``ACTIONS``), on which target (kind and id), and the target's public state before
and after as JSON (``None`` before a creation). The states come from ``serving.admin.views`` and are checked once
more here for names that only secrets carry, so a future projection cannot leak one into a table kept forever.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from serving.admin.operators import Role
from serving.errors import InvalidInput
from serving.storage.database import Database

ACTIONS: tuple[str, ...] = (
    "partner.create",
    "partner.plan",
    "partner.disable",
    "partner.enable",
    "plan.put",
    "key.issue",
    "key.revoke",
    "key.rotate",
    "oauth_client.create",
    "oauth_client.disable",
    "oauth_client.enable",
    "operator.create",
    "operator.role",
    "operator.disable",
    "operator.enable",
    "signing_key.rotate",
    "credit.grant",
)
TARGET_KINDS: tuple[str, ...] = ("partner", "plan", "key", "oauth_client", "operator", "signing_key", "credit")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

# Field names only a secret carries; a state holding one is a bug, refused before it is written.
_SECRET_FIELDS = frozenset({"api_key", "client_secret", "secret", "token", "digest", "private_pem", "private_key"})


@dataclass(frozen=True)
class AuditRecord:
    id: str
    at: float  # epoch seconds
    actor: str
    actor_role: str
    action: str
    target_kind: str
    target_id: str
    before: Any
    after: Any

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class AuditQuery:
    """Filters, all optional; ``since`` inclusive, ``until`` exclusive; newest first, at most ``limit`` rows."""

    actor: str | None = None
    action: str | None = None
    target_kind: str | None = None
    target_id: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(
        cls,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
    ) -> AuditQuery:
        """From the strings the admin API and the CLI take; ``target`` is ``kind`` or ``kind:id``."""
        if action and action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}; the actions are: {', '.join(ACTIONS)}", param="action")
        kind, _, target_id = (target or "").partition(":")
        if kind and kind not in TARGET_KINDS:
            raise InvalidInput(
                f"unknown target kind {kind!r}; the kinds are: {', '.join(TARGET_KINDS)}", param="target"
            )
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be in 1..{MAX_LIMIT}; got {limit}", param="limit")
        return cls(
            actor=actor or None,
            action=action or None,
            target_kind=kind or None,
            target_id=target_id or None,
            since=parse_instant(since, "since") if since else None,
            until=parse_instant(until, "until") if until else None,
            limit=limit,
        )


def parse_instant(raw: str, param: str) -> float:
    """Epoch seconds, or an ISO-8601 date or time (UTC when it names no offset)."""
    try:
        value = float(raw)
    except ValueError:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidInput(
                f"{param}: expected ISO-8601 (2026-11-01T12:00:00Z) or epoch seconds; got {raw!r}", param=param
            ) from None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(value):
        raise InvalidInput(f"{param}: not a finite number of seconds: {raw!r}", param=param)
    return value


def _check_public(state: Any, where: str) -> None:
    if isinstance(state, dict):
        for name, value in state.items():
            if name in _SECRET_FIELDS:
                raise ValueError(f"audit state {where} carries the secret field {name!r}")
            _check_public(value, where)
    elif isinstance(state, list):
        for value in state:
            _check_public(value, where)


def _dump(state: Any, where: str) -> str | None:
    _check_public(state, where)
    return None if state is None else json.dumps(state, sort_keys=True)


_COLUMNS = "id, at, actor, actor_role, action, target_kind, target_id, before_state, after_state"


class AuditLog:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db  # migrated by PartnerStore (same database)
        self._clock = clock

    def append(
        self, actor: str, role: Role, action: str, target_kind: str, target_id: str, before: Any, after: Any
    ) -> AuditRecord:
        """Writes one record; call it inside the change's transaction so both commit or neither does."""
        if action not in ACTIONS or target_kind not in TARGET_KINDS:
            raise ValueError(f"unknown audit action {action!r} or target kind {target_kind!r}")
        record_id = f"au_{secrets.token_hex(8)}"
        record = AuditRecord(record_id, self._clock(), actor, role.label, action, target_kind, target_id, before, after)
        self.db.execute(
            f"INSERT INTO audit_log ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.at,
                actor,
                record.actor_role,
                action,
                target_kind,
                target_id,
                _dump(before, "before"),
                _dump(after, "after"),
            ),
        )
        return record

    def query(self, query: AuditQuery) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("actor = ?", query.actor),
            ("action = ?", query.action),
            ("target_kind = ?", query.target_kind),
            ("target_id = ?", query.target_id),
            ("at >= ?", query.since),
            ("at < ?", query.until),
        ):
            if value is not None:
                where.append(column)
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(
            f"SELECT {_COLUMNS} FROM audit_log {clause} ORDER BY at DESC, id DESC LIMIT ?", (*params, query.limit)
        )
        return [
            AuditRecord(
                str(row[0]),
                float(row[1]),
                str(row[2]),
                str(row[3]),
                str(row[4]),
                str(row[5]),
                str(row[6]),
                None if row[7] is None else json.loads(row[7]),
                None if row[8] is None else json.loads(row[8]),
            )
            for row in rows
        ]
