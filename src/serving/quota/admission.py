"""Admission: reserve quota (shared across replicas), then wait fairly for a slot on the model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from serving.domain import Caller
from serving.errors import Overloaded
from serving.models.registry import ModelSpec
from serving.quota.fairqueue import FairQueue, Grant
from serving.quota.limiter import QuotaBackend, Reservation
from serving.settings import Admission as AdmissionSettings


class Admission:
    def __init__(
        self,
        quota: QuotaBackend,
        specs: list[ModelSpec],
        settings: AdmissionSettings,
        on_shed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.quota = quota
        self._on_shed = on_shed  # (model, reason) for each request the fair queue turns away
        self._settling: set[asyncio.Task[None]] = set()
        self.queues = {
            spec.id: FairQueue(
                spec.id,
                spec.admission.max_concurrency,
                settings.max_queue_per_partner,
                settings.max_wait_s,
                fair=settings.fair,
            )
            for spec in specs
        }

    async def reserve(self, caller: Caller, tokens: int) -> Reservation:
        return await self.quota.reserve(caller, uuid.uuid4().hex, tokens)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        await self.quota.settle(reservation, actual_tokens)

    def settle_soon(self, reservation: Reservation, actual_tokens: int) -> None:
        """Settles in the background so the response does not wait on the quota store's round trip."""
        settle_now = getattr(self.quota, "settle_now", None)
        if settle_now is not None:  # in-process quota: nothing to wait for
            settle_now(reservation, actual_tokens)
            return
        task = asyncio.get_running_loop().create_task(self.quota.settle(reservation, actual_tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Waits for background settlements (at shutdown, before the quota store closes)."""
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def enter(self, model: str, caller: Caller) -> None:
        try:
            await self.queues[model].acquire(caller.partner_id, caller.plan.weight)
        except Overloaded as exc:
            if self._on_shed is not None:
                self._on_shed(model, "queue_timeout" if isinstance(exc.__cause__, TimeoutError) else "queue_full")
            raise

    def leave(self, model: str) -> None:
        self.queues[model].release()

    def recent_grants(self, model: str) -> list[Grant]:
        """The model's last admissions in order (partner, wait, others waiting): the fair queue's decisions."""
        return self.queues[model].recent_grants()
