"""Admission: reserve quota (shared across replicas) and, for a prepaid plan, hold the request's maximum cost;
then wait fairly for a slot on the model."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from serving.commerce.prepaid import Hold, Prepaid
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
        self._in_process = getattr(quota, "settle_now", None) is not None
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
        can cost. With Redis the two go out together (one round trip: the hold's task and the quota's call join the
        same batch). Whatever one of them took is given back when the other refuses or fails, or the caller is
        cancelled; a hold whose reply was lost is released by its id."""
        reservation_id = uuid.uuid4().hex
        quota = self.quota.reserve(caller, reservation_id, input_tokens + max_output_tokens)
        if not caller.plan.prepaid:
            return await quota
        prepaid = self.prepaid
        if prepaid is None:
            quota.close()
            raise RuntimeError(f"plan {caller.plan.name!r} is prepaid but this gateway has no price book")
        hold = prepaid.hold(caller, model, input_tokens, max_output_tokens, reservation_id)
        # In-process stores have no round trip to share: one after the other, without a task.
        holding = None if self._in_process else asyncio.ensure_future(hold)
        try:
            reservation = await quota
        except BaseException:
            if holding is None:
                hold.close()
            else:
                holding.add_done_callback(functools.partial(self._give_back_hold, prepaid, caller.partner_id))
            raise
        try:
            # Shielded: a cancel of this caller must not cancel a hold Redis may apply anyway (it is given back).
            held = await (hold if holding is None else asyncio.shield(holding))
        except BaseException:
            self.settle_soon(reservation, Usage(), admitted=False)
            # A hold that failed left nothing held (a reserve with no answer is released by the wallet itself); one
            # still on its way (this caller was cancelled) is given back once it lands.
            if holding is not None and not holding.done():
                holding.add_done_callback(functools.partial(self._give_back_hold, prepaid, caller.partner_id))
            raise
        return Reservation(
            reservation.partner_id, reservation_id, reservation.tokens, reservation.month, reservation.limits,
            reservation.bucket, held,
        )  # fmt: skip

    def _give_back_hold(self, prepaid: Prepaid, partner_id: str, task: asyncio.Future[Hold]) -> None:
        if not task.cancelled() and task.exception() is None:
            hold = task.result()
            self._background(prepaid.release(partner_id, hold.hold_id))

    def settle_soon(self, reservation: Reservation, usage: Usage, admitted: bool = True) -> None:
        """Settles quota and money in the background so the response does not wait on the store's round trip;
        ``admitted`` False: the request was refused before it ran, so it draws no money."""
        hold, prepaid = reservation.hold, self.prepaid
        if hold is not None and prepaid is not None and not prepaid.settle_now(hold, usage, admitted):
            self._background(prepaid.settle(hold, usage, admitted))
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
