"""Admission: reserve quota (shared across replicas) and, for a prepaid plan, hold the request's maximum cost;
then wait fairly for a slot on the model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from serving.commerce.prepaid import Prepaid
from serving.domain import Caller, Usage
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
        prepaid: Prepaid | None = None,
    ) -> None:
        self.quota = quota
        self.prepaid = prepaid  # None: no price book here, so no plan may be prepaid
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

    async def reserve(self, caller: Caller, model: str, input_tokens: int, max_output_tokens: int = 0) -> Reservation:
        """Reserves ``input_tokens + max_output_tokens`` of quota; a prepaid plan also holds the most the request
        can cost (refused with ``InsufficientCredit``; the quota reservation is then released)."""
        reservation = await self.quota.reserve(caller, uuid.uuid4().hex, input_tokens + max_output_tokens)
        if not caller.plan.prepaid:
            return reservation
        try:
            if self.prepaid is None:
                raise RuntimeError(f"plan {caller.plan.name!r} is prepaid but this gateway has no price book")
            hold = await self.prepaid.hold(caller, model, input_tokens, max_output_tokens, reservation.reservation_id)
        except BaseException:
            self.settle_soon(reservation, Usage())
            raise
        return replace(reservation, hold=hold)

    def settle_soon(self, reservation: Reservation, usage: Usage) -> None:
        """Settles quota and money in the background so the response does not wait on the store's round trip."""
        if reservation.hold is not None and self.prepaid is not None:
            self._background(self.prepaid.settle(reservation.hold, usage))
        tokens = usage.input_tokens + usage.output_tokens
        settle_now = getattr(self.quota, "settle_now", None)
        if settle_now is not None:  # in-process quota: nothing to wait for
            settle_now(reservation, tokens)
            return
        self._background(self.quota.settle(reservation, tokens))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
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
