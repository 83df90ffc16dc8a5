"""The core's side of idempotency keys: claim a key (or get the outcome to replay), then store what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from serving.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    IdempotencyKeyReused,
    RequestInProgress,
    ServingError,
)
from serving.idempotency.codec import Outcome, decode, encode
from serving.idempotency.store import IdempotencyStore


class IdempotencyKeys:
    def __init__(self, store: IdempotencyStore, seen: Callable[[str, str], bool], retry_ttl_s: float = 600.0) -> None:
        self.store = store
        self.retry_ttl_s = retry_ttl_s
        self._seen = seen  # whether the ledger already holds a record with this id (blocking: run in a thread)
        # Its own threads: admin and usage queries on the loop's default pool cannot hold keyed requests up.
        self._lookups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="idempotency-ledger")

    async def claim(self, partner_id: str, key: str, fingerprint: str, retry_scoped: bool = False) -> Outcome | None:
        """None: this request holds the key and runs. Otherwise the stored outcome to replay (an error outcome is
        returned, not raised). Raises when the key cannot be used now or with this body.

        ``retry_scoped``: a key that only covers one call's retries (the SDK's automatic keys). Its outcome is kept
        for ``retry_ttl_s``, longer than any of those retries can come, so the ledger is not asked whether an
        expired outcome ran (that read is for long-lived keys)."""
        claim = await self.store.begin(partner_id, key, fingerprint)
        if claim.state == "in_progress":
            raise RequestInProgress(
                f"a request with idempotency key {key!r} is still running; retry after it finished to get its result",
                param="request_id",
                retry_after_s=1.0,
            )
        if claim.state == "mismatch":
            raise IdempotencyKeyReused(
                f"idempotency key {key!r} was already used with a different request body; send a new key for a"
                " new request (a retry must repeat the body exactly)",
                param="request_id",
            )
        if claim.state == "done":
            assert claim.outcome is not None
            return decode(claim.outcome, key)
        if retry_scoped:
            return None
        # A new claim, unless the ledger holds the id already (the stored outcome expired or the store was reset).
        try:
            seen = await asyncio.get_running_loop().run_in_executor(self._lookups, self._seen, partner_id, key)
        except BaseException:  # the ledger is unreachable (503): give the claim back so a retry can run
            await self.store.release(partner_id, key, fingerprint)
            raise
        if seen:
            await self.store.release(partner_id, key, fingerprint)
            raise AlreadyExists(
                f"request_id {key!r} was used by a request that ran and was billed, and its result is no longer"
                " kept for replay; send a new key",
                param="request_id",
            )
        return None

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def settle(
        self,
        partner_id: str,
        key: str,
        fingerprint: str,
        admitted: bool,
        result: Outcome | None,
        error: BaseException | None,
        output_tokens: int,
        retry_scoped: bool = False,
    ) -> None:
        """Releases the key of a request that was not admitted; stores the outcome of one that was."""
        if not admitted:
            await self.store.release(partner_id, key, fingerprint)
            return
        outcome: Outcome
        if result is not None and error is None:
            outcome = result
        elif isinstance(error, DeadlineExceeded | Cancelled):
            outcome = error
        elif isinstance(error, ServingError):
            # A retryable error (UNAVAILABLE after some output) must not be replayed as retryable: the request ran
            # and was billed, so its key is spent.
            outcome = AlreadyExists(
                f"the request with idempotency key {key!r} ran, was billed for {output_tokens} output tokens and then"
                f" failed ({error.message}); send a new key to run it again",
                param="request_id",
            )
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            outcome = Cancelled(
                f"the request with idempotency key {key!r} was cancelled by its client after {output_tokens} output"
                " tokens (billed); send a new key to run it again",
                param="request_id",
            )
        else:
            outcome = AlreadyExists(
                f"the request with idempotency key {key!r} failed after it was admitted; send a new key",
                param="request_id",
            )
        ttl_s = self.retry_ttl_s if retry_scoped else None
        await self.store.finish(partner_id, key, fingerprint, encode(outcome), ttl_s)
