"""Idempotency keys: a retry with the same key and the same body gets the original outcome back, not a second run.

A key (``request_id`` in the body or gRPC message, ``Idempotency-Key`` on HTTP) is claimed per partner when its
request arrives, together with a fingerprint of the request. The first request runs; once admitted its outcome
(the result, or the error it ended with) is stored for ``ttl_s`` (24 h by default). A later request with the key:

- same fingerprint, outcome stored: the stored outcome, replayed (not run, not metered again);
- same fingerprint, still running: ``in_progress`` (409 / ABORTED with retry-after);
- another fingerprint: ``mismatch`` (422 / FAILED_PRECONDITION).

A request that is not admitted (invalid, over quota, shed) releases its key, so a retry runs normally. An outcome
larger than ``max_bytes`` is stored as a marker that says so (the retry is refused, never run twice). This module
holds the contract and the in-process store (one gateway replica); ``redis_store`` shares keys across replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

ClaimState = Literal["new", "in_progress", "mismatch", "done"]
TOO_LARGE = b"\x00too-large"  # stored instead of an outcome over the size cap


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    outcome: bytes | None = None  # the stored outcome when ``done``


class IdempotencyStore(Protocol):
    async def begin(self, partner_id: str, key: str, fingerprint: str) -> Claim:
        """Claims the key for this request (``new``), or says why it cannot run."""
        ...

    async def finish(
        self, partner_id: str, key: str, fingerprint: str, outcome: bytes, ttl_s: float | None = None
    ) -> None:
        """Stores the outcome of the request that claimed the key (admitted: it ran and was metered), for ``ttl_s``
        (None: the store's own, 24 h by default)."""
        ...

    async def release(self, partner_id: str, key: str, fingerprint: str) -> None:
        """Gives the key back: its request was not admitted, so a retry may run."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Entry:
    fingerprint: str
    expires_at: float
    outcome: bytes | None = None  # None while the request runs


class MemoryIdempotency:
    """Exact for one gateway replica. Bounded: at most ``max_entries`` keys and ``max_total_bytes`` of outcomes;
    past either bound the oldest finished entries go first (a running request's claim is never evicted)."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        running_ttl_s: float,
        max_entries: int = 100_000,
        max_total_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._running_ttl_s = running_ttl_s
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._max_total_bytes = max_total_bytes
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0

    async def begin(self, partner_id: str, key: str, fingerprint: str) -> Claim:
        now = self._clock()
        entry = self._entries.get((partner_id, key))
        if entry is not None and entry.expires_at <= now:
            self._drop((partner_id, key))
            entry = None
        if entry is None:
            self._entries[(partner_id, key)] = _Entry(fingerprint, now + self._running_ttl_s)
            self._evict()
            return Claim("new")
        if entry.fingerprint != fingerprint:
            return Claim("mismatch")
        if entry.outcome is None:
            return Claim("in_progress")
        return Claim("done", entry.outcome)

    async def finish(
        self, partner_id: str, key: str, fingerprint: str, outcome: bytes, ttl_s: float | None = None
    ) -> None:
        entry = self._entries.get((partner_id, key))
        if entry is None or entry.fingerprint != fingerprint:
            entry = _Entry(fingerprint, 0.0)  # evicted or expired while it ran: keep the outcome all the same
            self._entries[(partner_id, key)] = entry
        stored = outcome if len(outcome) <= self._max_bytes else TOO_LARGE
        self._bytes += len(stored) - len(entry.outcome or b"")
        entry.outcome = stored
        entry.expires_at = self._clock() + (self._ttl_s if ttl_s is None else ttl_s)
        self._entries.move_to_end((partner_id, key))
        self._evict()

    async def release(self, partner_id: str, key: str, fingerprint: str) -> None:
        entry = self._entries.get((partner_id, key))
        if entry is not None and entry.outcome is None and entry.fingerprint == fingerprint:
            self._drop((partner_id, key))

    async def close(self) -> None:
        pass

    def _drop(self, at: tuple[str, str]) -> None:
        entry = self._entries.pop(at)
        self._bytes -= len(entry.outcome or b"")

    def _evict(self) -> None:
        excess = len(self._entries) - self._max_entries
        over_bytes = self._bytes - self._max_total_bytes
        if excess <= 0 and over_bytes <= 0:
            return
        victims: list[tuple[str, str]] = []
        for at, entry in self._entries.items():  # oldest first; stops as soon as enough is found
            if excess <= 0 and over_bytes <= 0:
                break
            if entry.outcome is not None:
                victims.append(at)
                excess -= 1
                over_bytes -= len(entry.outcome)
        for at in victims:
            self._drop(at)
