"""The admin HTTP API (partners, plans, keys, any partner's usage), behind a separate admin token.

Partner API keys are never accepted here. Changes land in the shared store; every gateway replica sees
them within its auth cache TTL (2 s by default), without a restart.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from serving.errors import InvalidInput, NotFound, PermissionDenied, Unauthenticated
from serving.metering.usage import usage_by_day
from serving.partners.store import Partner, PartnerNotFound, PartnerStore, PlanNotFound
from serving.plans import Plan, PlanError
from serving.storage.database import Database


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


def _partner_json(partner: Partner) -> dict[str, Any]:
    return {"id": partner.id, "name": partner.name, "plan": partner.plan, "disabled": partner.disabled}


def admin_router(store: PartnerStore, ledger_db: Database, admin_token: str | None) -> APIRouter:
    def require_admin(request: Request) -> None:
        if admin_token is None:
            raise PermissionDenied("the admin API is disabled; set SERVING_ADMIN_TOKEN to enable it")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("admin routes need 'Authorization: Bearer <admin token>'", param="authorization")
        if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise PermissionDenied("this is not the admin token (partner API keys are not accepted here)")

    router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)])

    async def run(fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (PartnerNotFound, PlanNotFound) as exc:
            raise NotFound(str(exc)) from exc  # NOT_FOUND / 404
        except PlanError as exc:
            raise InvalidInput(str(exc)) from exc

    @router.get("/partners")
    async def list_partners() -> list[dict[str, Any]]:
        return [_partner_json(p) for p in await run(store.partners)]

    @router.post("/partners", status_code=201)
    async def create_partner(body: PartnerBody) -> dict[str, Any]:
        partner, created = await run(store.ensure_partner, body.name, body.plan)
        if not created:
            raise InvalidInput(f"a partner named {body.name!r} already exists", param="name")
        return _partner_json(partner)

    @router.get("/partners/{partner_id}")
    async def show_partner(partner_id: str) -> dict[str, Any]:
        partner = await run(store.partner, partner_id)
        keys = await run(store.keys, partner.id)
        return {
            **_partner_json(partner),
            "keys": [{"key_id": k.key_id, "revoked": k.revoked, "created_at": k.created_at} for k in keys],
        }

    @router.post("/partners/{partner_id}/plan")
    async def set_plan(partner_id: str, body: PlanChange) -> dict[str, Any]:
        partner = await run(store.partner, partner_id)
        await run(store.set_plan, partner.id, body.plan)
        return _partner_json(await run(store.partner, partner.id))

    @router.post("/partners/{partner_id}/disabled")
    async def set_disabled(partner_id: str, body: DisableBody) -> dict[str, Any]:
        partner = await run(store.partner, partner_id)
        await run(store.set_disabled, partner.id, body.disabled)
        return _partner_json(await run(store.partner, partner.id))

    @router.post("/partners/{partner_id}/keys", status_code=201)
    async def issue_key(partner_id: str) -> dict[str, str]:
        partner = await run(store.partner, partner_id)
        key = await run(store.issue_key, partner.id)
        return {"api_key": key, "key_id": key.split("_")[1]}

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        if await run(store.key, key_id) is None:
            raise NotFound(f"no key {key_id!r}")
        return {"key_id": key_id, "revoked": await run(store.revoke_key, key_id)}

    @router.post("/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(key_id: str) -> dict[str, str]:
        key = await run(store.rotate_key, key_id)
        return {"api_key": key, "key_id": key.split("_")[1], "revoked": key_id}

    @router.get("/plans")
    async def list_plans() -> list[dict[str, Any]]:
        return [p.as_dict() for p in await run(store.plans)]

    @router.put("/plans/{name}")
    async def put_plan(name: str, body: PlanBody) -> dict[str, Any]:
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
            )
        except PlanError as exc:
            raise InvalidInput(str(exc)) from exc
        await run(store.put_plan, plan)
        return plan.as_dict()

    @router.get("/usage")
    async def partner_usage(partner: str, start_day: str, end_day: str) -> list[dict[str, Any]]:
        found = await run(store.partner, partner)
        rows = await run(usage_by_day, ledger_db, found.id, start_day, end_day)
        return [vars(row) for row in rows]

    return router
