"""Usage-alert webhooks on the partner port: register, list and delete endpoints, list an endpoint's deliveries,
replay one. A partner sees only its own endpoints and deliveries (another partner's are 404, like ones that do not
exist). Reading needs the ``usage:read`` scope; registering, deleting and replaying need ``webhooks:write``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from serving.gateway.core import Core
from serving.gateway.http_common import HttpConfig, call_context
from serving.identity.scopes import USAGE_READ, WEBHOOKS_WRITE
from serving.webhooks.service import WebhookService
from serving.webhooks.store import Attempt, Delivery, Endpoint

DEFAULT_THRESHOLDS = (50, 80, 100)


class EndpointBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: StrictStr
    thresholds: list[StrictInt] = list(DEFAULT_THRESHOLDS)  # percent of the monthly token budget


class EndpointView(BaseModel):
    id: str
    url: str
    thresholds: list[int]
    created_at: float

    @classmethod
    def of(cls, endpoint: Endpoint) -> EndpointView:
        return cls(
            id=endpoint.id, url=endpoint.url, thresholds=list(endpoint.thresholds), created_at=endpoint.created_at
        )


class CreatedEndpoint(EndpointView):
    secret: str  # shown once: signs every delivery to this endpoint


class EndpointList(BaseModel):
    data: list[EndpointView]


class Deleted(BaseModel):
    id: str
    deleted: bool


class AttemptView(BaseModel):
    number: int
    started_at: float
    duration_ms: float
    status_code: int | None
    error: str | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptView:
        return cls(
            number=attempt.number,
            started_at=attempt.started_at,
            duration_ms=round(attempt.duration_ms, 3),
            status_code=attempt.status_code,
            error=attempt.error,
        )


class DeliveryView(BaseModel):
    id: str
    event_id: str
    endpoint_id: str
    status: str  # pending, delivered, failed, cancelled
    attempts: int
    next_attempt_at: float | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None
    event: dict[str, Any]  # the body every attempt sends
    attempt_log: list[AttemptView]

    @classmethod
    def of(cls, d: Delivery) -> DeliveryView:
        return cls(
            id=d.id,
            event_id=d.event_id,
            endpoint_id=d.endpoint_id,
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
            event=d.event,
            attempt_log=[AttemptView.of(a) for a in d.attempt_log],
        )


class DeliveryList(BaseModel):
    data: list[DeliveryView]


def webhooks_router(core: Core, config: HttpConfig, webhooks: WebhookService) -> APIRouter:
    router = APIRouter(tags=["webhooks"])

    async def partner(request: Request, scope: str) -> str:
        return (await core.authenticate(call_context(request, config), scope)).partner_id

    @router.post("/v1/webhooks", status_code=201, response_model=CreatedEndpoint)
    async def register(body: EndpointBody, request: Request) -> CreatedEndpoint:
        """Registers an endpoint for usage alerts; the reply holds its signing secret, shown this once."""
        partner_id = await partner(request, WEBHOOKS_WRITE)
        endpoint, secret = await asyncio.to_thread(webhooks.register, partner_id, body.url, body.thresholds)
        webhooks.evaluate_soon()
        return CreatedEndpoint(**EndpointView.of(endpoint).model_dump(), secret=secret)

    @router.get("/v1/webhooks", response_model=EndpointList)
    async def endpoints(request: Request) -> EndpointList:
        partner_id = await partner(request, USAGE_READ)
        return EndpointList(data=[EndpointView.of(e) for e in await asyncio.to_thread(webhooks.endpoints, partner_id)])

    @router.delete("/v1/webhooks/{endpoint_id}", response_model=Deleted)
    async def delete(endpoint_id: str, request: Request) -> Deleted:
        """Deletes the endpoint and cancels its deliveries still pending."""
        partner_id = await partner(request, WEBHOOKS_WRITE)
        await asyncio.to_thread(webhooks.delete, partner_id, endpoint_id)
        return Deleted(id=endpoint_id, deleted=True)

    @router.get("/v1/webhooks/{endpoint_id}/deliveries", response_model=DeliveryList)
    async def deliveries(endpoint_id: str, request: Request, limit: int = Query(100, ge=1, le=1000)) -> DeliveryList:
        """The endpoint's deliveries, newest first, each with its status and attempts."""
        partner_id = await partner(request, USAGE_READ)
        found = await asyncio.to_thread(webhooks.deliveries, partner_id, endpoint_id, limit)
        return DeliveryList(data=[DeliveryView.of(d) for d in found])

    @router.post("/v1/webhooks/deliveries/{delivery_id}/replay", status_code=202, response_model=DeliveryView)
    async def replay(delivery_id: str, request: Request) -> DeliveryView:
        """Sends the delivery's event again (same event id and body) as a new series of attempts, now."""
        partner_id = await partner(request, WEBHOOKS_WRITE)
        delivery = await asyncio.to_thread(webhooks.replay, partner_id, delivery_id)
        webhooks.wake()
        return DeliveryView.of(delivery)

    return router
