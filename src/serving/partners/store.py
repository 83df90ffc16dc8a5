"""Partners, plans and API keys, through the storage layer (SQLite by default, PostgreSQL at scale)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from serving.partners.keys import new_key
from serving.plans import DEFAULT_PLAN, DEFAULT_PLANS, Plan
from serving.storage.database import Database
from serving.storage.migrations import migrate


class PartnerNotFound(LookupError):
    pass


class PlanNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Partner:
    id: str
    name: str
    plan: str
    disabled: bool


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    partner_id: str
    digest: str
    revoked: bool
    created_at: float


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
        for plan in DEFAULT_PLANS:
            db.execute("INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING", plan.row())

    def close(self) -> None:
        self.db.close()

    # --- plans ----------------------------------------------------------------------------------------

    def put_plan(self, plan: Plan) -> None:
        self.db.execute(
            "INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute,"
            " max_concurrent = excluded.max_concurrent, monthly_tokens = excluded.monthly_tokens,"
            " allowed_models = excluded.allowed_models, weight = excluded.weight,"
            " ip_allowlist = excluded.ip_allowlist",
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

    def issue_key(self, partner_id: str) -> str:
        """A new key for the partner; the plain key is returned once and never stored."""
        key, parsed = new_key()
        self.db.execute(
            "INSERT INTO api_keys (key_id, partner_id, digest, created_at) VALUES (?, ?, ?, ?)",
            (parsed.key_id, partner_id, parsed.digest, time.time()),
        )
        return key

    def revoke_key(self, key_id: str) -> bool:
        changed = self.db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return changed > 0

    def rotate_key(self, key_id: str) -> str:
        """Issues a replacement key for the same partner and revokes the old one, atomically."""
        stored = self.key(key_id)
        if stored is None:
            raise PartnerNotFound(f"no key {key_id!r}")
        with self.db.transaction():
            key = self.issue_key(stored.partner_id)
            self.revoke_key(key_id)
        return key

    def key(self, key_id: str) -> StoredKey | None:
        row = self.db.one(
            "SELECT key_id, partner_id, digest, revoked_at, created_at FROM api_keys WHERE key_id = ?", (key_id,)
        )
        if row is None:
            return None
        return StoredKey(key_id=row[0], partner_id=row[1], digest=row[2], revoked=row[3] is not None, created_at=row[4])

    def keys(self, partner_id: str) -> list[StoredKey]:
        rows = self.db.query(
            "SELECT key_id, partner_id, digest, revoked_at, created_at FROM api_keys WHERE partner_id = ?"
            " ORDER BY created_at",
            (partner_id,),
        )
        return [StoredKey(r[0], r[1], r[2], r[3] is not None, r[4]) for r in rows]

    def key_owner(self, key_id: str) -> KeyOwner | None:
        row = self.db.one(
            "SELECT k.key_id, k.partner_id, k.digest, k.revoked_at, k.created_at, p.name, p.plan, p.disabled,"
            " pl.* FROM api_keys k JOIN partners p ON p.id = k.partner_id JOIN plans pl ON pl.name = p.plan"
            " WHERE k.key_id = ?",
            (key_id,),
        )
        if row is None:
            return None
        key = StoredKey(row[0], row[1], row[2], row[3] is not None, row[4])
        partner = Partner(id=row[1], name=row[5], plan=row[6], disabled=bool(row[7]))
        return KeyOwner(key=key, partner=partner, plan=Plan.from_row(row[8:]))
