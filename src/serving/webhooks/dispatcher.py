"""Sends due deliveries: claims them with a lease in the database, POSTs each event's JSON body signed, and records
the attempt; a failure is tried again after an exponential backoff with jitter, up to ``max_attempts`` per series.

A 2xx answer delivers; anything else (another status, a redirect, which is never followed, a connection error, no
answer within ``timeout_s``) is a failed attempt. The response body is never read.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import httpx

from serving.settings import Webhooks
from serving.webhooks.backoff import backoff_s
from serving.webhooks.signer import ATTEMPT_HEADER, DELIVERY_ID_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, sign
from serving.webhooks.store import DELIVERED, FAILED, PENDING, Attempt, Claimed, WebhookStore

USER_AGENT = "serving-webhooks/1"
LEASE_MARGIN_S = 30.0  # a lease outlives its attempt by this much (recording the outcome, clock skew)


def build_client(config: Webhooks) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=config.timeout_s, follow_redirects=False, headers={"user-agent": USER_AGENT})


class Dispatcher:
    def __init__(
        self,
        store: WebhookStore,
        config: Webhooks,
        owner: str,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._config = config
        self._owner = owner  # names this replica's leases
        self._client = client
        self._clock = clock
        self._jitter = jitter

    @property
    def lease_s(self) -> float:
        return self._config.timeout_s + LEASE_MARGIN_S

    async def run_once(self) -> int:
        """Claims up to ``batch`` due deliveries and sends them concurrently; returns how many it claimed."""
        config = self._config
        claimed = await asyncio.to_thread(self._store.claim, self._owner, self._clock(), self.lease_s, config.batch)
        if claimed:
            await asyncio.gather(*(self._deliver(c) for c in claimed))
        return len(claimed)

    async def _deliver(self, claimed: Claimed) -> None:
        attempt = await self._post(claimed)
        config = self._config
        in_series = claimed.attempt - claimed.series_start
        now = self._clock()
        if attempt.delivered:
            status, next_at = DELIVERED, now
        elif in_series >= config.max_attempts:
            status, next_at = FAILED, now
        else:
            status = PENDING
            next_at = now + backoff_s(in_series, config.backoff_base_s, config.backoff_max_s, self._jitter())
        await asyncio.to_thread(self._store.finish, claimed, self._owner, attempt, status, next_at)

    async def _post(self, claimed: Claimed) -> Attempt:
        body = claimed.payload.encode()
        started_at = self._clock()
        headers = {
            "content-type": "application/json",
            EVENT_ID_HEADER: claimed.event_id,
            DELIVERY_ID_HEADER: claimed.delivery_id,
            ATTEMPT_HEADER: str(claimed.attempt),
            SIGNATURE_HEADER: sign(claimed.secret, body, int(started_at)),
        }
        began = time.perf_counter()
        code: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self._config.timeout_s):  # the whole attempt, not each phase
                async with self._client.stream("POST", claimed.url, content=body, headers=headers) as response:
                    code = response.status_code
        except TimeoutError:
            error = f"no answer within {self._config.timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if code is not None and not 200 <= code < 300:
            error = f"answered HTTP {code}" + (" (redirects are not followed)" if 300 <= code < 400 else "")
        return Attempt(claimed.attempt, started_at, (time.perf_counter() - began) * 1000, code, error)
