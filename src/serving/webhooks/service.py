"""A gateway replica's webhooks: the partner operations behind ``/v1/webhooks`` and the two background loops
(evaluate thresholds, dispatch deliveries), started and stopped with the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from serving.settings import Webhooks
from serving.webhooks.dispatcher import Dispatcher, build_client
from serving.webhooks.evaluator import Evaluator, PeriodUsage
from serving.webhooks.events import CreditSnapshot
from serving.webhooks.signer import new_secret
from serving.webhooks.store import Delivery, Endpoint, Subscription, WebhookStore
from serving.webhooks.urls import validate_thresholds, validate_url

log = logging.getLogger("serving.webhooks")

STOP_MARGIN_S = 5.0  # a graceful stop waits for attempts in flight this much longer than their timeout

# A subscribed partner's active credit grants and what is used of them (None: it has none).
BalanceSource = Callable[[Subscription], Awaitable[CreditSnapshot | None]]


class _Loop:
    """Runs ``step`` every ``interval_s`` (sooner when woken) until stopped; a failing step is logged once per spell
    of failures, not once per round."""

    def __init__(self, name: str, step: Callable[[], Awaitable[bool]], interval_s: float) -> None:
        self.name = name
        self._step = step  # True: run again at once (there may be more to do)
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._failing = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            again = False
            try:
                again = await self._step()
                if self._failing:
                    log.warning("webhook %s works again", self.name)
                    self._failing = False
            except Exception:
                if not self._failing:
                    log.warning("webhook %s failed; retrying every %g s", self.name, self._interval_s, exc_info=True)
                    self._failing = True
            if again or self._stopping:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()


class WebhookService:
    def __init__(
        self,
        store: WebhookStore,
        usage: PeriodUsage,
        config: Webhooks,
        owner: str,
        clock: Callable[[], float] = time.time,
        balances: BalanceSource | None = None,
    ) -> None:
        """``balances``: where the ``credit_balance`` metric comes from (None: only ``monthly_tokens``)."""
        self.store = store
        self._balances = balances
        self.config = config
        self._clock = clock
        self._client = build_client(config)
        self.evaluator = Evaluator(store, usage, clock)
        # Leases name the replica and this start of it: a restarted replica never mistakes an old lease for its own.
        self.dispatcher = Dispatcher(store, config, f"{owner}/{uuid.uuid4().hex[:8]}", self._client, clock)
        self._evaluate = _Loop("evaluation", self._evaluate_once, config.evaluate_interval_s)
        self._dispatch = _Loop("dispatch", self._dispatch_once, config.dispatch_interval_s)
        self._tasks: list[asyncio.Task[None]] = []

    # --- background loops -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.enabled and not self._tasks:
            self._tasks = [self._spawn(self._evaluate.run()), self._spawn(self._dispatch.run())]

    @staticmethod
    def _spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(work)

    async def _evaluate_once(self) -> bool:
        balances = await self._balance_snapshots()
        if await asyncio.to_thread(self.evaluator.run, balances):
            self._dispatch.wake()  # new deliveries: send them now, not at the next dispatch round
        return False

    async def _balance_snapshots(self) -> dict[str, CreditSnapshot]:
        """Each subscribed partner's credit snapshot (a partner whose balance cannot be read now is skipped: its
        crossings are found on a later round)."""
        if self._balances is None:
            return {}
        snapshots = {}
        for sub in await asyncio.to_thread(self.store.subscriptions):
            try:
                snapshot = await self._balances(sub)
            except Exception as exc:
                log.warning("credit balance of %s unreadable for its alerts: %r", sub.partner_id, exc)
                continue
            if snapshot is not None:
                snapshots[sub.partner_id] = snapshot
        return snapshots

    async def _dispatch_once(self) -> bool:
        return await self.dispatcher.run_once() >= self.config.batch  # a full batch: more may be due

    def wake(self) -> None:
        """Sends due deliveries now (after a replay). Call on the event loop."""
        self._dispatch.wake()

    def evaluate_soon(self) -> None:
        """Evaluates now (a new endpoint hears of this month's crossings at once). Call on the event loop."""
        self._evaluate.wake()

    async def stop(self) -> None:
        """Stops claiming; attempts in flight get their timeout to finish (their leases would otherwise make another
        replica wait for them to expire), then the loops are cancelled. Idempotent."""
        self._evaluate.stop()
        self._dispatch.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.config.timeout_s + STOP_MARGIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    # --- partner operations (blocking: call from a worker thread) -------------------------------------

    def register(self, partner_id: str, url: str, thresholds: list[int]) -> tuple[Endpoint, str]:
        """A new endpoint and its signing secret (returned this once; stored to sign with)."""
        checked_url = validate_url(url, self.config.allow_loopback)
        checked = validate_thresholds(thresholds)
        secret = new_secret()
        endpoint = self.store.create_endpoint(
            partner_id, checked_url, checked, secret, self.config.max_endpoints, self._clock()
        )
        return endpoint, secret

    def endpoints(self, partner_id: str) -> list[Endpoint]:
        return self.store.endpoints(partner_id)

    def delete(self, partner_id: str, endpoint_id: str) -> None:
        self.store.delete_endpoint(partner_id, endpoint_id, self._clock())

    def deliveries(self, partner_id: str, endpoint_id: str, limit: int) -> list[Delivery]:
        return self.store.deliveries(partner_id, endpoint_id, limit)

    def replay(self, partner_id: str, delivery_id: str) -> Delivery:
        return self.store.replay(partner_id, delivery_id, self._clock())
