"""Admission: reserve quota (shared across replicas), then wait fairly for a slot on the model."""

from __future__ import annotations

import uuid

from serving.domain import Caller
from serving.models.registry import ModelSpec
from serving.quota.fairqueue import FairQueue
from serving.quota.limiter import QuotaBackend, Reservation
from serving.settings import Admission as AdmissionSettings


class Admission:
    def __init__(self, quota: QuotaBackend, specs: list[ModelSpec], settings: AdmissionSettings) -> None:
        self.quota = quota
        self.queues = {
            spec.id: FairQueue(
                spec.id, spec.admission.max_concurrency, settings.max_queue_per_partner, settings.max_wait_s
            )
            for spec in specs
        }

    async def reserve(self, caller: Caller, tokens: int) -> Reservation:
        return await self.quota.reserve(caller, uuid.uuid4().hex, tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        await self.quota.settle(reservation, actual_tokens)

    async def enter(self, model: str, caller: Caller) -> None:
        await self.queues[model].acquire(caller.partner_id, caller.plan.weight)

    def leave(self, model: str) -> None:
        self.queues[model].release()

    async def claim_request_id(self, caller: Caller, request_id: str) -> bool:
        return await self.quota.claim_request_id(caller.partner_id, request_id)

    async def release_request_id(self, caller: Caller, request_id: str) -> None:
        await self.quota.release_request_id(caller.partner_id, request_id)
