"""Partners, plans and API keys, through the storage layer (SQLite by default, PostgreSQL at scale)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from serving.identity.clients import ClientOwner, OAuthClients
from serving.identity.scopes import format_scopes, parse_scopes
from serving.identity.signing import SigningKeys
from serving.partners.keys import new_key
from serving.partners.records import Partner as Partner  # re-exported: callers import them from here
from serving.partners.records import PartnerNotFound as PartnerNotFound
from serving.plans import DEFAULT_PLAN, DEFAULT_PLANS, Plan
from serving.storage.database import Database
from serving.storage.migrations import migrate


class PlanNotFound(LookupError):
    pass


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    partner_id: str
    digest: str
    revoked: bool
    created_at: float
    scopes: frozenset[str] | None = None  # None: every scope (a key issued without scopes)

    def public(self) -> dict[str, object]:
        """What admin routes and the audit log show: never the digest."""
        scopes = None if self.scopes is None else format_scopes(self.scopes).split()
        return {"key_id": self.key_id, "revoked": self.revoked, "created_at": self.created_at, "scopes": scopes}


def _stored_key(row: tuple[object, ...]) -> StoredKey:
    """From ``key_id, partner_id, digest, revoked_at, created_at, scopes``."""
    scopes = None if row[5] is None else parse_scopes(str(row[5]))
    return StoredKey(str(row[0]), str(row[1]), str(row[2]), row[3] is not None, float(row[4]), scopes)  # type: ignore[arg-type]


_KEY_COLUMNS = "k.key_id, k.partner_id, k.digest, k.revoked_at, k.created_at, k.scopes"


@dataclass(frozen=True)
class KeyOwner:
    """What authentication needs about a key, in one lookup."""

    key: StoredKey
    partner: Partner
    plan: Plan


class PartnerStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db)
        self.clients = OAuthClients(db)  # OAuth clients and token signing keys live in this database too
        self.signing = SigningKeys(db)
        for plan in DEFAULT_PLANS:
            db.execute("INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING", plan.row())

    def close(self) -> None:
        self.db.close()

    # --- plans ----------------------------------------------------------------------------------------

    def put_plan(self, plan: Plan) -> None:
        self.db.execute(
            "INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute,"
            " max_concurrent = excluded.max_concurrent, monthly_tokens = excluded.monthly_tokens,"
            " allowed_models = excluded.allowed_models, weight = excluded.weight,"
            " ip_allowlist = excluded.ip_allowlist, prepaid = excluded.prepaid",
            plan.row(),
        )

    def plan(self, name: str) -> Plan:
        row = self.db.one("SELECT * FROM plans WHERE name = ?", (name,))
        if row is None:
            raise PlanNotFound(f"no plan named {name!r}")
        return Plan.from_row(row)

    def plans(self) -> list[Plan]:
        return [Plan.from_row(row) for row in self.db.query("SELECT * FROM plans ORDER BY name")]

    # --- partners -------------------------------------------------------------------------------------

    def create_partner(self, name: str, plan: str = DEFAULT_PLAN) -> Partner:
        self.plan(plan)
        partner = Partner(id=f"p_{uuid.uuid4().hex[:12]}", name=name, plan=plan, disabled=False)
        self.db.execute(
            "INSERT INTO partners (id, name, plan, created_at) VALUES (?, ?, ?, ?)",
            (partner.id, name, plan, time.time()),
        )
        return partner

    def _partner(self, column: str, value: str) -> Partner:
        row = self.db.one(f"SELECT id, name, plan, disabled FROM partners WHERE {column} = ?", (value,))
        if row is None:
            raise PartnerNotFound(f"no partner with {column} {value!r}")
        return Partner(id=row[0], name=row[1], plan=row[2], disabled=bool(row[3]))

    def partner(self, id_or_name: str) -> Partner:
        try:
            return self._partner("id", id_or_name)
        except PartnerNotFound:
            return self._partner("name", id_or_name)

    def partner_by_name(self, name: str) -> Partner:
        return self._partner("name", name)

    def partners(self) -> list[Partner]:
        rows = self.db.query("SELECT id, name, plan, disabled FROM partners ORDER BY name")
        return [Partner(id=r[0], name=r[1], plan=r[2], disabled=bool(r[3])) for r in rows]

    def ensure_partner(self, name: str, plan: str = DEFAULT_PLAN) -> tuple[Partner, bool]:
        """The named partner, creating it when missing; the flag says whether it was created."""
        try:
            return self.partner_by_name(name), False
        except PartnerNotFound:
            return self.create_partner(name, plan), True

    def set_plan(self, partner_id: str, plan: str) -> None:
        self.plan(plan)
        if not self.db.execute("UPDATE partners SET plan = ? WHERE id = ?", (plan, partner_id)):
            raise PartnerNotFound(f"no partner with id {partner_id!r}")

    def set_disabled(self, partner_id: str, disabled: bool) -> None:
        if not self.db.execute("UPDATE partners SET disabled = ? WHERE id = ?", (int(disabled), partner_id)):
            raise PartnerNotFound(f"no partner with id {partner_id!r}")

    # --- keys -----------------------------------------------------------------------------------------

    def issue_key(self, partner_id: str, scopes: frozenset[str] | None = None) -> str:
        """A new key for the partner; the plain key is returned once and never stored. ``scopes`` None: every
        scope."""
        key, parsed = new_key()
        self.db.execute(
            "INSERT INTO api_keys (key_id, partner_id, digest, created_at, scopes) VALUES (?, ?, ?, ?, ?)",
            (parsed.key_id, partner_id, parsed.digest, time.time(), None if scopes is None else format_scopes(scopes)),
        )
        return key

    def revoke_key(self, key_id: str) -> bool:
        changed = self.db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return changed > 0

    def rotate_key(self, key_id: str) -> str:
        """Issues a replacement key for the same partner (same scopes) and revokes the old one, atomically."""
        stored = self.key(key_id)
        if stored is None:
            raise PartnerNotFound(f"no key {key_id!r}")
        with self.db.transaction():
            key = self.issue_key(stored.partner_id, stored.scopes)
            self.revoke_key(key_id)
        return key

    def key(self, key_id: str) -> StoredKey | None:
        row = self.db.one(f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.key_id = ?", (key_id,))
        return None if row is None else _stored_key(row)

    def keys(self, partner_id: str) -> list[StoredKey]:
        rows = self.db.query(
            f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.partner_id = ? ORDER BY k.created_at", (partner_id,)
        )
        return [_stored_key(row) for row in rows]

    def key_owner(self, key_id: str) -> KeyOwner | None:
        row = self.db.one(
            f"SELECT {_KEY_COLUMNS}, p.name, p.plan, p.disabled, pl.* FROM api_keys k"
            " JOIN partners p ON p.id = k.partner_id JOIN plans pl ON pl.name = p.plan WHERE k.key_id = ?",
            (key_id,),
        )
        if row is None:
            return None
        key = _stored_key(row)
        partner = Partner(id=key.partner_id, name=row[6], plan=row[7], disabled=bool(row[8]))
        return KeyOwner(key=key, partner=partner, plan=Plan.from_row(row[9:]))

    # --- OAuth clients --------------------------------------------------------------------------------

    def client_owner(self, client_id: str) -> ClientOwner | None:
        return self.clients.owner(client_id)
