"""The admin HTTP API (partners, plans, keys, OAuth clients, signing keys, operators, the audit log, any partner's
usage), on the private ops listener only.

Every route needs a bearer token: an operator's token (``serving operators create``) or the legacy admin token
(``SERVING_ADMIN_TOKEN``, an owner named ``admin-token``); each route names the least role it needs (docs/admin.md),
and the ``Admin`` service checks it again. Partner API keys and access tokens are refused (403), a missing or unknown
token is 401, too low a role 403. Every change is written with its audit record in one transaction. Changes land in
the shared store; every gateway replica sees them within its auth cache TTL (2 s by default), without a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from serving.admin.audit import AuditQuery, parse_instant
from serving.admin.operators import Role
from serving.admin.service import Actor, Admin, allow
from serving.admin.views import client_view, credit_view, key_view, operator_view, partner_view
from serving.errors import InvalidInput
from serving.identity.scopes import ScopeError, parse_scopes
from serving.metering.usage import usage_by_day
from serving.observability.metrics import Metrics
from serving.partners.store import PartnerStore
from serving.plans import Plan, PlanError
from serving.storage.database import Database

T = TypeVar("T")


class PartnerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    plan: StrictStr = "standard"


class PlanChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: StrictStr


class DisableBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disabled: StrictBool


class PlanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    monthly_tokens: int = 0
    allowed_models: list[StrictStr] = []
    weight: float = 1.0
    ip_allowlist: list[StrictStr] = []
    prepaid: StrictBool = False


class CreditBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: StrictStr  # purchased | promotional
    amount: StrictStr  # a decimal string: money is never a JSON number
    priority: int = 100  # lower is drawn first
    expires_at: StrictStr | float | None = None  # ISO-8601 or epoch seconds; None: never
    note: StrictStr = ""


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[StrictStr] | None = None  # None: every scope


class ClientBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    scopes: list[StrictStr]


class OperatorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    role: StrictStr


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr


def _scopes(raw: list[str]) -> frozenset[str]:
    try:
        return parse_scopes(raw)
    except ScopeError as exc:
        raise InvalidInput(str(exc), param="scopes") from exc


def _role(raw: str) -> Role:
    try:
        return Role.parse(raw)
    except ValueError as exc:
        raise InvalidInput(str(exc), param="role") from exc


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def admin_router(
    store: PartnerStore,
    ledger_db: Database,
    admin_token: str | None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """``admin_token``: the legacy shared token (an owner), None for none; ``metrics`` counts the changes."""
    admin = Admin(store, admin_token, metrics, clock)

    def need(role: Role) -> Callable[[Request], Awaitable[Actor]]:
        async def caller(request: Request) -> Actor:
            actor = await asyncio.to_thread(admin.authenticate, _bearer(request))
            allow(actor, role)  # before the body is validated or anything is looked up
            return actor

        return caller

    viewer, operator, owner = (Depends(need(role)) for role in (Role.VIEWER, Role.OPERATOR, Role.OWNER))
    router = APIRouter(prefix="/admin/v1", tags=["admin"])

    async def run(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # --- partners, keys, plans, usage -------------------------------------------------------------------

    @router.get("/partners")
    async def list_partners(actor: Actor = viewer) -> list[dict[str, Any]]:
        return [partner_view(p) for p in await run(admin.partners, actor)]

    @router.post("/partners", status_code=201)
    async def create_partner(body: PartnerBody, actor: Actor = operator) -> dict[str, Any]:
        return partner_view(await run(admin.create_partner, actor, body.name, body.plan))

    @router.get("/partners/{partner_id}")
    async def show_partner(partner_id: str, actor: Actor = viewer) -> dict[str, Any]:
        partner = await run(admin.partner, actor, partner_id)
        keys = await run(admin.keys, actor, partner.id)
        return {**partner_view(partner), "keys": [key.public() for key in keys]}

    @router.post("/partners/{partner_id}/plan")
    async def set_plan(partner_id: str, body: PlanChange, actor: Actor = operator) -> dict[str, Any]:
        return partner_view(await run(admin.set_plan, actor, partner_id, body.plan))

    @router.post("/partners/{partner_id}/disabled")
    async def set_disabled(partner_id: str, body: DisableBody, actor: Actor = operator) -> dict[str, Any]:
        return partner_view(await run(admin.set_partner_disabled, actor, partner_id, body.disabled))

    @router.post("/partners/{partner_id}/keys", status_code=201)
    async def issue_key(partner_id: str, body: KeyBody | None = None, actor: Actor = operator) -> dict[str, Any]:
        scopes = None if body is None or body.scopes is None else _scopes(body.scopes)
        key, stored = await run(admin.issue_key, actor, partner_id, scopes)
        return {"api_key": key, **key_view(stored)}

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, actor: Actor = operator) -> dict[str, Any]:
        return {"key_id": key_id, "revoked": await run(admin.revoke_key, actor, key_id)}

    @router.post("/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(key_id: str, actor: Actor = operator) -> dict[str, Any]:
        key, stored = await run(admin.rotate_key, actor, key_id)
        return {"api_key": key, **key_view(stored), "revoked": key_id}

    @router.get("/plans")
    async def list_plans(actor: Actor = viewer) -> list[dict[str, Any]]:
        return [p.as_dict() for p in await run(admin.plans, actor)]

    @router.put("/plans/{name}")
    async def put_plan(name: str, body: PlanBody, actor: Actor = operator) -> dict[str, Any]:
        try:
            plan = Plan(
                name=name,
                requests_per_minute=body.requests_per_minute,
                tokens_per_minute=body.tokens_per_minute,
                max_concurrent=body.max_concurrent,
                monthly_tokens=body.monthly_tokens,
                allowed_models=tuple(body.allowed_models),
                weight=body.weight,
                ip_allowlist=tuple(body.ip_allowlist),
                prepaid=body.prepaid,
            )
        except PlanError as exc:
            raise InvalidInput(str(exc)) from exc
        return (await run(admin.put_plan, actor, plan)).as_dict()

    @router.get("/usage")
    async def partner_usage(partner: str, start_day: str, end_day: str, actor: Actor = viewer) -> list[dict[str, Any]]:
        found = await run(admin.partner, actor, partner)
        rows = await run(usage_by_day, ledger_db, found.id, start_day, end_day)
        return [vars(row) for row in rows]

    @router.get("/partners/{partner_id}/credits")
    async def list_credits(partner_id: str, actor: Actor = viewer) -> list[dict[str, Any]]:
        return [credit_view(g) for g in await run(admin.credit_grants, actor, partner_id)]

    @router.post("/partners/{partner_id}/credits", status_code=201)
    async def grant_credit(partner_id: str, body: CreditBody, actor: Actor = operator) -> dict[str, Any]:
        expires = None if body.expires_at is None else parse_instant(str(body.expires_at), "expires_at")
        grant = await run(
            admin.grant_credit, actor, partner_id, body.kind, body.amount, body.priority, expires, body.note
        )
        return credit_view(grant)

    # --- OAuth clients ----------------------------------------------------------------------------------

    @router.post("/partners/{partner_id}/oauth-clients", status_code=201)
    async def create_client(partner_id: str, body: ClientBody, actor: Actor = operator) -> dict[str, Any]:
        client, secret = await run(admin.create_client, actor, partner_id, body.name, _scopes(body.scopes))
        return {**client_view(client), "client_secret": secret}

    @router.get("/oauth-clients")
    async def list_clients(partner: str | None = None, actor: Actor = viewer) -> list[dict[str, Any]]:
        return [client_view(c) for c in await run(admin.clients, actor, partner)]

    @router.get("/oauth-clients/{client_id}")
    async def show_client(client_id: str, actor: Actor = viewer) -> dict[str, Any]:
        return client_view(await run(admin.client, actor, client_id))

    @router.post("/oauth-clients/{client_id}/disabled")
    async def set_client_disabled(client_id: str, body: DisableBody, actor: Actor = operator) -> dict[str, Any]:
        return client_view(await run(admin.set_client_disabled, actor, client_id, body.disabled))

    # --- signing keys, operators, audit -----------------------------------------------------------------

    @router.get("/signing-keys")
    async def list_signing_keys(actor: Actor = viewer) -> list[dict[str, Any]]:
        return await run(admin.signing_keys, actor)

    @router.post("/signing-keys/rotate", status_code=201)
    async def rotate_signing_key(actor: Actor = owner) -> dict[str, Any]:
        kid, retired = await run(admin.rotate_signing_key, actor)
        return {"kid": kid, "retired": retired}

    @router.get("/operators")
    async def list_operators(actor: Actor = owner) -> list[dict[str, Any]]:
        return [operator_view(o) for o in await run(admin.operator_list, actor)]

    @router.post("/operators", status_code=201)
    async def create_operator(body: OperatorBody, actor: Actor = owner) -> dict[str, Any]:
        created, token = await run(admin.create_operator, actor, body.name, _role(body.role))
        return {**operator_view(created), "token": token}

    @router.post("/operators/{name}/role")
    async def set_operator_role(name: str, body: RoleBody, actor: Actor = owner) -> dict[str, Any]:
        return operator_view(await run(admin.set_operator_role, actor, name, _role(body.role)))

    @router.post("/operators/{name}/disabled")
    async def set_operator_disabled(name: str, body: DisableBody, actor: Actor = owner) -> dict[str, Any]:
        return operator_view(await run(admin.set_operator_disabled, actor, name, body.disabled))

    @router.get("/audit")
    async def audit(
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        caller: Actor = viewer,
    ) -> list[dict[str, Any]]:
        """Newest first; ``target`` is a kind or ``kind:id``; ``since``/``until``: ISO-8601 or epoch seconds."""
        query = AuditQuery.parse(actor, action, target, since, until, limit)
        return [record.as_dict() for record in await run(admin.audit, caller, query)]

    return router
