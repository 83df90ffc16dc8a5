"""``Admin``: every admin read and change, for the admin HTTP API and the ``serving`` CLI alike.

Each method takes the ``Actor`` making the call and checks its role first. A change and its audit record are
written in one transaction (stores' own transactions join it), so a change is never left unrecorded and a record
never describes a change that was rolled back; the metric counts the record once it committed. Store errors leave
as the domain errors of ``serving.errors`` (unknown → NOT_FOUND, invalid → INVALID_ARGUMENT).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serving.admin.audit import ACTIONS, AuditLog, AuditQuery, AuditRecord
from serving.admin.operators import Operator, OperatorError, OperatorNotFound, OperatorStore, Role
from serving.admin.views import (
    View,
    client_view,
    credit_view,
    key_view,
    operator_view,
    partner_view,
    plan_view,
    signing_key_view,
)
from serving.commerce.credits import CreditError, CreditGrant, CreditStore
from serving.commerce.money import MoneyError, parse_amount
from serving.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from serving.identity.clients import ClientNotFound, OAuthClient
from serving.identity.scopes import ScopeError
from serving.identity.tokens import looks_like_jwt
from serving.observability.metrics import Metrics
from serving.partners.keys import parse_key
from serving.partners.records import Partner, PartnerNotFound
from serving.partners.store import PartnerStore, PlanNotFound, StoredKey
from serving.plans import DEFAULT_PLAN, Plan, PlanError
from serving.storage.database import DuplicateRow

LEGACY_ACTOR = "admin-token"  # the actor name of SERVING_ADMIN_TOKEN, an owner


@dataclass(frozen=True)
class Actor:
    name: str
    role: Role


def local_owner(user: str) -> Actor:
    """The CLI without a token: whoever holds the database credentials has owner power anyway."""
    return Actor(f"local:{user}", Role.OWNER)


def allow(actor: Actor, needed: Role) -> None:
    if actor.role < needed:
        raise PermissionDenied(
            f"this needs the {needed.label} role; {actor.name} has the {actor.role.label} role", param="authorization"
        )


@contextmanager
def domain_errors() -> Iterator[None]:
    try:
        yield
    except (PartnerNotFound, PlanNotFound, ClientNotFound, OperatorNotFound) as exc:
        raise NotFound(str(exc)) from exc
    except (PlanError, ScopeError, OperatorError, CreditError, MoneyError) as exc:
        raise InvalidInput(str(exc)) from exc


@dataclass
class _Change:
    """What the audit record of a change says; filled in by the change."""

    kind: str = ""
    target_id: str = ""
    before: Any = None
    after: Any = None

    def record(self, kind: str, target_id: str, before: Any, after: Any) -> None:
        self.kind, self.target_id, self.before, self.after = kind, target_id, before, after


class Admin:
    """Blocking (database calls): the HTTP API runs it on worker threads."""

    def __init__(
        self,
        store: PartnerStore,
        admin_token: str | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.operators = OperatorStore(store.db, clock)  # PartnerStore migrated the database
        self.audit_log = AuditLog(store.db, clock)
        self.credits = CreditStore(store.db)
        self._admin_token = admin_token or None
        self._metrics = metrics
        if metrics is not None:  # every action's series exists from the start, at zero
            for action in ACTIONS:
                metrics.admin_changes.labels(action)

    # --- who is calling ---------------------------------------------------------------------------------

    def authenticate(self, credential: str | None) -> Actor:
        """An operator token or the legacy admin token; partner credentials are refused (403), anything else 401."""
        if not credential:
            raise Unauthenticated("admin routes need 'Authorization: Bearer <operator token>'", param="authorization")
        if self._admin_token is not None and hmac.compare_digest(credential.encode(), self._admin_token.encode()):
            return Actor(LEGACY_ACTOR, Role.OWNER)
        operator = self.operators.authenticate(credential)
        if operator is not None:
            return Actor(operator.name, operator.role)
        if parse_key(credential) is not None or looks_like_jwt(credential):
            raise PermissionDenied(
                "partner API keys and access tokens are not accepted here; use an operator token",
                param="authorization",
            )
        raise Unauthenticated("unknown or disabled operator token", param="authorization")

    @contextmanager
    def _read(self, actor: Actor, needed: Role = Role.VIEWER) -> Iterator[None]:
        allow(actor, needed)
        with domain_errors():
            yield

    @contextmanager
    def _change(self, actor: Actor, needed: Role, action: str) -> Iterator[_Change]:
        allow(actor, needed)
        change = _Change()
        with domain_errors(), self.store.db.transaction():
            yield change
            assert change.kind, f"{action} recorded no target"
            self.audit_log.append(
                actor.name, actor.role, action, change.kind, change.target_id, change.before, change.after
            )
        if self._metrics is not None:
            self._metrics.admin_changes.labels(action).inc()

    # --- reads (viewer; operators: owner) ---------------------------------------------------------------

    def partners(self, actor: Actor) -> list[Partner]:
        with self._read(actor):
            return self.store.partners()

    def partner(self, actor: Actor, ref: str) -> Partner:
        """By id or name."""
        with self._read(actor):
            return self.store.partner(ref)

    def keys(self, actor: Actor, partner_id: str) -> list[StoredKey]:
        with self._read(actor):
            return self.store.keys(partner_id)

    def plan(self, actor: Actor, name: str) -> Plan:
        with self._read(actor):
            return self.store.plan(name)

    def plans(self, actor: Actor) -> list[Plan]:
        with self._read(actor):
            return self.store.plans()

    def clients(self, actor: Actor, partner_ref: str | None = None) -> list[OAuthClient]:
        with self._read(actor):
            partner_id = self.store.partner(partner_ref).id if partner_ref else None
            return self.store.clients.list(partner_id)

    def client(self, actor: Actor, client_id: str) -> OAuthClient:
        with self._read(actor):
            return self.store.clients.get(client_id)

    def signing_keys(self, actor: Actor) -> list[View]:
        """The verifying keys, newest (the one signing) first: public information only."""
        with self._read(actor):
            return [signing_key_view(key, i == 0) for i, key in enumerate(self.store.signing.public_keys())]

    def operator_list(self, actor: Actor) -> list[Operator]:
        with self._read(actor, Role.OWNER):
            return self.operators.list()

    def audit(self, actor: Actor, query: AuditQuery) -> list[AuditRecord]:
        with self._read(actor):
            return self.audit_log.query(query)

    # --- partners, plans, keys, OAuth clients (operator) ------------------------------------------------

    def create_partner(self, actor: Actor, name: str, plan: str = DEFAULT_PLAN) -> Partner:
        with self._change(actor, Role.OPERATOR, "partner.create") as change:
            try:
                existing = self.store.partner_by_name(name)
            except PartnerNotFound:
                pass
            else:
                raise InvalidInput(f"a partner named {name!r} already exists ({existing.id})", param="name")
            try:
                partner = self.store.create_partner(name, plan)
            except DuplicateRow as exc:  # created by another writer since the check
                raise InvalidInput(f"a partner named {name!r} already exists", param="name") from exc
            change.record("partner", partner.id, None, partner_view(partner))
        return partner

    def set_plan(self, actor: Actor, ref: str, plan: str) -> Partner:
        with self._change(actor, Role.OPERATOR, "partner.plan") as change:
            before = self.store.partner(ref)
            self.store.set_plan(before.id, plan)
            after = self.store.partner(before.id)
            change.record("partner", before.id, partner_view(before), partner_view(after))
        return after

    def set_partner_disabled(self, actor: Actor, ref: str, disabled: bool) -> Partner:
        with self._change(actor, Role.OPERATOR, "partner.disable" if disabled else "partner.enable") as change:
            before = self.store.partner(ref)
            self.store.set_disabled(before.id, disabled)
            after = self.store.partner(before.id)
            change.record("partner", before.id, partner_view(before), partner_view(after))
        return after

    def put_plan(self, actor: Actor, plan: Plan) -> Plan:
        """Creates the plan or replaces it whole."""
        with self._change(actor, Role.OPERATOR, "plan.put") as change:
            try:
                before: View | None = plan_view(self.store.plan(plan.name))
            except PlanNotFound:
                before = None
            self.store.put_plan(plan)
            after = self.store.plan(plan.name)
            change.record("plan", plan.name, before, plan_view(after))
        return after

    def issue_key(self, actor: Actor, partner_ref: str, scopes: frozenset[str] | None = None) -> tuple[str, StoredKey]:
        """A new key (returned once) and what is stored about it; ``scopes`` None: every scope."""
        if scopes is not None and not scopes:
            raise InvalidInput("a key needs at least one scope; leave scopes out for every scope", param="scopes")
        with self._change(actor, Role.OPERATOR, "key.issue") as change:
            partner = self.store.partner(partner_ref)
            key = self.store.issue_key(partner.id, scopes)
            stored = self._stored(key)
            change.record("key", stored.key_id, None, key_view(stored))
        return key, stored

    def revoke_key(self, actor: Actor, key_id: str) -> bool:
        """Whether this call revoked it (False: it was revoked before)."""
        with self._change(actor, Role.OPERATOR, "key.revoke") as change:
            before = self._key(key_id)
            revoked = self.store.revoke_key(key_id)
            change.record("key", key_id, key_view(before), key_view(self._key(key_id)))
        return revoked

    def rotate_key(self, actor: Actor, key_id: str) -> tuple[str, StoredKey]:
        """A replacement key (returned once, same partner and scopes); the old key is revoked."""
        with self._change(actor, Role.OPERATOR, "key.rotate") as change:
            before = self._key(key_id)
            key = self.store.rotate_key(key_id)
            stored = self._stored(key)
            after = {**key_view(self._key(key_id)), "replaced_by": key_view(stored)}
            change.record("key", key_id, key_view(before), after)
        return key, stored

    def create_client(
        self, actor: Actor, partner_ref: str, name: str, scopes: frozenset[str]
    ) -> tuple[OAuthClient, str]:
        """A new OAuth client and its secret (returned once)."""
        if not name.strip():
            raise InvalidInput("an OAuth client needs a name", param="name")
        if not scopes:
            raise InvalidInput("an OAuth client needs at least one scope", param="scopes")
        with self._change(actor, Role.OPERATOR, "oauth_client.create") as change:
            partner = self.store.partner(partner_ref)
            client, secret = self.store.clients.create(partner.id, name, scopes)
            change.record("oauth_client", client.client_id, None, client_view(client))
        return client, secret

    def set_client_disabled(self, actor: Actor, client_id: str, disabled: bool) -> OAuthClient:
        action = "oauth_client.disable" if disabled else "oauth_client.enable"
        with self._change(actor, Role.OPERATOR, action) as change:
            before = self.store.clients.get(client_id)
            after = self.store.clients.set_disabled(client_id, disabled)
            change.record("oauth_client", client_id, client_view(before), client_view(after))
        return after

    def credit_grants(self, actor: Actor, partner_ref: str) -> list[CreditGrant]:
        """A partner's credit grants, in draw order."""
        with self._read(actor):
            return self.credits.grants(self.store.partner(partner_ref).id)

    def grant_credit(
        self,
        actor: Actor,
        partner_ref: str,
        kind: str,
        amount: str,
        priority: int = 100,
        expires_at: float | None = None,
        note: str = "",
    ) -> CreditGrant:
        """Grants credit (purchased or promotional) to a partner; ``amount`` a decimal string, ``priority`` lower
        drawn first. Invoices and prepaid admission see it within the gateways' cache TTL."""
        with self._change(actor, Role.OPERATOR, "credit.grant") as change:
            partner = self.store.partner(partner_ref)
            value = parse_amount(amount)
            grant = self.credits.grant(
                partner.id, kind, value, priority=priority, expires_at=expires_at, note=note, granted_by=actor.name
            )
            change.record("credit", grant.id, None, credit_view(grant))
        return grant

    # --- operators and signing keys (owner) -------------------------------------------------------------

    def create_operator(self, actor: Actor, name: str, role: Role) -> tuple[Operator, str]:
        """A new operator and its token (returned once)."""
        with self._change(actor, Role.OWNER, "operator.create") as change:
            operator, token = self.operators.create(name, role)
            change.record("operator", name, None, operator_view(operator))
        return operator, token

    def set_operator_role(self, actor: Actor, name: str, role: Role) -> Operator:
        with self._change(actor, Role.OWNER, "operator.role") as change:
            before = self.operators.get(name)
            after = self.operators.set_role(name, role)
            change.record("operator", name, operator_view(before), operator_view(after))
        return after

    def set_operator_disabled(self, actor: Actor, name: str, disabled: bool) -> Operator:
        with self._change(actor, Role.OWNER, "operator.disable" if disabled else "operator.enable") as change:
            before = self.operators.get(name)
            after = self.operators.set_disabled(name, disabled)
            change.record("operator", name, operator_view(before), operator_view(after))
        return after

    def rotate_signing_key(self, actor: Actor) -> tuple[str, list[str]]:
        """A new token signing key; returns its id and the ids retired (see ``SigningKeys.rotate``)."""
        with self._change(actor, Role.OWNER, "signing_key.rotate") as change:
            before = [key.kid for key in self.store.signing.public_keys()]
            kid, retired = self.store.signing.rotate()
            after = {"signing": kid, "verifying": [key.kid for key in self.store.signing.public_keys()]}
            change.record("signing_key", kid, {"verifying": before}, {**after, "retired": retired})
        return kid, retired

    # --- helpers ----------------------------------------------------------------------------------------

    def _key(self, key_id: str) -> StoredKey:
        stored = self.store.key(key_id)
        if stored is None:
            raise NotFound(f"no key {key_id!r}")
        return stored

    def _stored(self, key: str) -> StoredKey:
        parsed = parse_key(key)
        assert parsed is not None
        return self._key(parsed.key_id)
