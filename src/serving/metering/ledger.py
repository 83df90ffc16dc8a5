"""The usage ledger: exactly one record per admitted request, durable and idempotent by request id.

``record()`` appends to the local journal (one write, microseconds) and queues the record; a writer
thread wakes every ``flush_interval_s`` (or when a full batch waits) and inserts the queued records in
batches (``ON CONFLICT DO NOTHING`` on partner + request id), off the hot path and without a thread
switch per request. On start the ledger replays journal segments an earlier process left behind (after SIGKILL);
on close it flushes everything before returning. What a SIGKILL cannot lose: every acknowledged record
(it was journaled before the response left). What it may leave: records of requests whose response was
cut off by the kill (journaled, never acknowledged); they are stored once, never twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from serving.metering.journal import Journal
from serving.metering.record import INSERT_SQL, UsageRecord
from serving.storage.database import Database, DatabaseUnavailable
from serving.storage.migrations import migrate

log = logging.getLogger("serving.ledger")


class Ledger:
    def __init__(
        self,
        db: Database,
        journal_dir: Path,
        *,
        max_batch: int = 1000,
        flush_interval_s: float = 0.05,
        observe_lag: Callable[[float], None] | None = None,
    ) -> None:
        self.db = db
        self._observe_lag = observe_lag  # seconds from a request's end to its record being stored
        migrate(db)
        self.journal = Journal(journal_dir)
        self._max_batch = max_batch
        self._flush_interval_s = flush_interval_s
        self._pending: deque[tuple[int, UsageRecord]] = deque()
        self._flush_waiters: deque[threading.Event] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self.written = 0
        self.outages = 0  # spells of failing writes so far (each logged once, when it starts and when it ends)
        self.in_outage = threading.Event()  # set while writes fail (waitable: the writer met the outage)
        self.replayed = self._replay()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def _replay(self) -> int:
        count = 0
        for path in self.journal.pending_segments():
            records = list(Journal.read(path))
            for start in range(0, len(records), self._max_batch):
                with self.db.transaction():
                    self.db.executemany(INSERT_SQL, [r.row() for r in records[start : start + self._max_batch]])
            path.unlink()
            count += len(records)
        if count:
            log.info("replayed %d usage records from the journal", count)
        return count

    def record(self, record: UsageRecord) -> None:
        segment = self.journal.append(record)
        self._pending.append((segment, record))
        if len(self._pending) >= self._max_batch:
            self._wake.set()  # otherwise the writer picks it up on its next tick, without a thread switch now

    def seen(self, partner_id: str, request_id: str) -> bool:
        row = self.db.one(
            "SELECT 1 FROM usage_records WHERE partner_id = ? AND request_id = ?", (partner_id, request_id)
        )
        return row is not None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            waiters = []
            while self._flush_waiters:
                waiters.append(self._flush_waiters.popleft())
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
                self._write(batch)
            for done in waiters:
                done.set()
            if stopping:
                return

    def _write(self, batch: list[tuple[int, UsageRecord]]) -> None:
        failing_since: float | None = None
        while True:
            try:
                with self.db.transaction():
                    self.db.executemany(INSERT_SQL, [record.row() for _, record in batch])
                break
            except Exception as exc:  # the database is away: the journal keeps the records; retry
                if failing_since is None:  # one line per outage, not one per retry
                    failing_since = time.monotonic()
                    self.outages += 1
                    self.in_outage.set()
                    unreachable = isinstance(exc, DatabaseUnavailable)
                    log.error(
                        "ledger write failed (%s); the journal keeps %d records, retrying every 1 s",
                        exc.__cause__ if unreachable and exc.__cause__ else exc,
                        len(batch) + self.backlog,
                        exc_info=not unreachable,  # anything but an unreachable database gets its traceback
                    )
                else:
                    log.debug("ledger write failed again: %s", exc)
                time.sleep(1.0)
        if failing_since is not None:
            self.in_outage.clear()
            log.warning("ledger writes resumed after %.1f s", time.monotonic() - failing_since)
        self.written += len(batch)
        self.journal.stored([segment for segment, _ in batch])
        if self._observe_lag is not None:
            now = time.time()
            for _, record in batch:
                self._observe_lag(max(0.0, now - record.finished_at))

    def flush(self) -> None:
        """Blocks until every record queued so far is in the database."""
        done = threading.Event()
        self._flush_waiters.append(done)
        self._wake.set()
        done.wait()

    def close(self, timeout_s: float = 30.0) -> None:
        """Flushes every queued record, then stops the writer. If the database stays away past the timeout,
        the records stay in the journal and the next start replays them."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        stored = not self._thread.is_alive()
        if not stored:
            log.error("ledger database unreachable at shutdown; %d records stay in the journal", self.backlog)
        self.journal.close(all_stored=stored)
