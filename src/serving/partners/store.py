"""Partners and API keys in SQLite (WAL) under the data directory."""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from serving.partners.keys import new_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS partners (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    partner_id TEXT NOT NULL REFERENCES partners(id),
    digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class PartnerNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Partner:
    id: str
    name: str
    disabled: bool


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    partner_id: str
    digest: str
    active: bool


class PartnerStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create_partner(self, name: str) -> Partner:
        partner = Partner(id=f"p_{uuid.uuid4().hex[:12]}", name=name, disabled=False)
        self._db.execute(
            "INSERT INTO partners (id, name, created_at) VALUES (?, ?, ?)", (partner.id, name, time.time())
        )
        return partner

    def partner_by_name(self, name: str) -> Partner:
        row = self._db.execute("SELECT id, name, disabled FROM partners WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise PartnerNotFound(f"no partner named {name!r}")
        return Partner(id=row[0], name=row[1], disabled=bool(row[2]))

    def ensure_partner(self, name: str) -> tuple[Partner, bool]:
        """The named partner, creating it when missing; the flag says whether it was created."""
        try:
            return self.partner_by_name(name), False
        except PartnerNotFound:
            return self.create_partner(name), True

    def issue_key(self, partner_id: str) -> str:
        """A new key for the partner; the plain key is returned once and never stored."""
        key, parsed = new_key()
        self._db.execute(
            "INSERT INTO api_keys (key_id, partner_id, digest, created_at) VALUES (?, ?, ?, ?)",
            (parsed.key_id, partner_id, parsed.digest, time.time()),
        )
        return key

    def revoke_key(self, key_id: str) -> None:
        self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )

    def key(self, key_id: str) -> StoredKey | None:
        row = self._db.execute(
            "SELECT k.key_id, k.partner_id, k.digest, k.revoked_at IS NULL AND p.disabled = 0"
            " FROM api_keys k JOIN partners p ON p.id = k.partner_id WHERE k.key_id = ?",
            (key_id,),
        ).fetchone()
        if row is None:
            return None
        return StoredKey(key_id=row[0], partner_id=row[1], digest=row[2], active=bool(row[3]))
