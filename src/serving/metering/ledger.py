"""The usage ledger: exactly one record per admitted request, durable and idempotent by request id.

``record()`` appends to the local journal (one write, microseconds) and queues the record; a writer
thread inserts queued records in batches (``ON CONFLICT DO NOTHING`` on partner + request id) off the
hot path. On start the ledger replays journal segments an earlier process left behind (after SIGKILL);
on close it flushes everything before returning. What a SIGKILL cannot lose: every acknowledged record
(it was journaled before the response left). What it may leave: records of requests whose response was
cut off by the kill (journaled, never acknowledged); they are stored once, never twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from serving.metering.journal import Journal
from serving.metering.record import INSERT_SQL, UsageRecord
from serving.storage.database import Database
from serving.storage.migrations import migrate

log = logging.getLogger("serving.ledger")

_STOP = object()


class Ledger:
    def __init__(
        self, db: Database, journal_dir: Path, *, max_batch: int = 1000, flush_interval_s: float = 0.05
    ) -> None:
        self.db = db
        migrate(db)
        self.journal = Journal(journal_dir)
        self._max_batch = max_batch
        self._flush_interval_s = flush_interval_s
        self._queue: queue.Queue[object] = queue.Queue()
        self._oldest_pending: float | None = None
        self.written = 0
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
        self._queue.put((segment, record))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[int, UsageRecord]] = []
            item = self._queue.get()
            deadline = time.monotonic() + self._flush_interval_s
            flushed: list[threading.Event] = []
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, threading.Event):
                    flushed.append(item)
                    break
                else:
                    batch.append(item)  # type: ignore[arg-type]
                if stopping or len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for event in flushed:
                event.set()

    def _write(self, batch: list[tuple[int, UsageRecord]]) -> None:
        while True:
            try:
                with self.db.transaction():
                    self.db.executemany(INSERT_SQL, [record.row() for _, record in batch])
                break
            except Exception:  # the database is away: the journal keeps the records; retry
                log.exception("ledger write failed; retrying in 1 s")
                time.sleep(1.0)
        self.written += len(batch)
        self.journal.stored([segment for segment, _ in batch])

    def flush(self) -> None:
        """Blocks until every record queued so far is in the database."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self) -> None:
        """Flushes every queued record, then stops the writer."""
        self._queue.put(_STOP)
        self._thread.join()
        self.journal.close(all_stored=True)
