"""OAuth2 clients (RFC 6749 §4.4, client credentials): a client belongs to one partner and holds a set of scopes.

The client id (``oc_<16 hex>``) is public; the secret (``ocs_<43 url-safe chars>``, 32 random bytes) is shown
once at creation and only its SHA-256 digest is stored (its entropy makes a slow hash unnecessary, as for API
keys), compared in constant time.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from serving.identity.scopes import format_scopes, parse_scopes
from serving.partners.keys import digest, digest_matches
from serving.partners.records import Partner, PartnerNotFound
from serving.plans import Plan
from serving.storage.database import Database

CLIENT_PREFIX = "oc_"
_SECRET_PREFIX = "ocs_"


class ClientNotFound(LookupError):
    pass


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    partner_id: str
    name: str
    scopes: frozenset[str]
    created_at: float
    disabled: bool

    def public(self) -> dict[str, object]:
        """What admin routes and the audit log show: never the secret or its digest."""
        return {
            "client_id": self.client_id,
            "partner_id": self.partner_id,
            "name": self.name,
            "scopes": format_scopes(self.scopes).split(),
            "created_at": self.created_at,
            "disabled": self.disabled,
        }


@dataclass(frozen=True)
class ClientOwner:
    """What the token endpoint and the gateway's token check need about a client, in one lookup."""

    client: OAuthClient
    digest: str
    partner: Partner
    plan: Plan


def is_client_id(value: str) -> bool:
    return value.startswith(CLIENT_PREFIX)


_COLUMNS = "c.client_id, c.partner_id, c.name, c.scopes, c.created_at, c.disabled_at"


def _client(row: tuple[object, ...]) -> OAuthClient:
    return OAuthClient(
        client_id=str(row[0]),
        partner_id=str(row[1]),
        name=str(row[2]),
        scopes=parse_scopes(str(row[3])),
        created_at=float(row[4]),  # type: ignore[arg-type]
        disabled=row[5] is not None,
    )


class OAuthClients:
    def __init__(self, db: Database) -> None:
        self.db = db  # migrated by PartnerStore (same database)

    def create(self, partner_id: str, name: str, scopes: frozenset[str]) -> tuple[OAuthClient, str]:
        """A new client and its secret (returned once, never stored)."""
        if not scopes:
            raise ValueError("an OAuth client needs at least one scope")
        if self.db.one("SELECT id FROM partners WHERE id = ?", (partner_id,)) is None:
            raise PartnerNotFound(f"no partner with id {partner_id!r}")
        client_id = f"{CLIENT_PREFIX}{secrets.token_hex(8)}"
        secret = f"{_SECRET_PREFIX}{secrets.token_urlsafe(32)}"
        now = time.time()
        self.db.execute(
            "INSERT INTO oauth_clients (client_id, partner_id, name, digest, scopes, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (client_id, partner_id, name, digest(secret), format_scopes(scopes), now),
        )
        return OAuthClient(client_id, partner_id, name, scopes, now, False), secret

    def get(self, client_id: str) -> OAuthClient:
        row = self.db.one(f"SELECT {_COLUMNS} FROM oauth_clients c WHERE c.client_id = ?", (client_id,))
        if row is None:
            raise ClientNotFound(f"no OAuth client {client_id!r}")
        return _client(row)

    def list(self, partner_id: str | None = None) -> list[OAuthClient]:
        where, params = ("WHERE c.partner_id = ?", (partner_id,)) if partner_id else ("", ())
        rows = self.db.query(f"SELECT {_COLUMNS} FROM oauth_clients c {where} ORDER BY c.created_at", params)
        return [_client(row) for row in rows]

    def set_disabled(self, client_id: str, disabled: bool) -> OAuthClient:
        changed = self.db.execute(
            "UPDATE oauth_clients SET disabled_at = ? WHERE client_id = ?",
            (time.time() if disabled else None, client_id),
        )
        if not changed:
            raise ClientNotFound(f"no OAuth client {client_id!r}")
        return self.get(client_id)

    def owner(self, client_id: str) -> ClientOwner | None:
        row = self.db.one(
            f"SELECT {_COLUMNS}, c.digest, p.name, p.plan, p.disabled, pl.* FROM oauth_clients c"
            " JOIN partners p ON p.id = c.partner_id JOIN plans pl ON pl.name = p.plan WHERE c.client_id = ?",
            (client_id,),
        )
        if row is None:
            return None
        client = _client(row)
        partner = Partner(id=client.partner_id, name=str(row[7]), plan=str(row[8]), disabled=bool(row[9]))
        return ClientOwner(client=client, digest=str(row[6]), partner=partner, plan=Plan.from_row(row[10:]))


def secret_matches(owner: ClientOwner, secret: str) -> bool:
    return digest_matches(secret, owner.digest)
