"""A local append-only journal that makes usage records survive a killed process.

Each record is one ``write()`` to an ``O_APPEND`` file before the response is sent: the bytes sit in the
kernel's page cache, so SIGKILL of the gateway cannot lose them (an OS crash or power loss can lose the
last unsynced writes; set ``fsync=True`` to close that gap at the cost of latency). The ledger writer
copies records into the database in batches and deletes a segment once every record in it is stored.
A torn last line (the process died inside ``write``) belongs to a request that was never acknowledged.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from serving.metering.record import UsageRecord

_SEGMENT_RECORDS = 50_000


class Journal:
    def __init__(self, directory: Path, fsync: bool = False) -> None:
        self.directory = directory
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._appended: dict[int, int] = {}
        self._stored: dict[int, int] = {}
        existing = [int(p.stem) for p in directory.glob("*.jsonl") if p.stem.isdigit()]
        self._segment = max(existing, default=0) + 1
        self._fd = self._open(self._segment)
        self._closed = False

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.jsonl"

    def _open(self, segment: int) -> int:
        self._appended[segment] = 0
        self._stored[segment] = 0
        return os.open(self._path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def pending_segments(self) -> list[Path]:
        """Segments left by an earlier process (to replay), oldest first."""
        return sorted(p for p in self.directory.glob("*.jsonl") if int(p.stem) < self._segment)

    @staticmethod
    def read(path: Path) -> Iterator[UsageRecord]:
        for line in path.read_text().splitlines():
            try:
                yield UsageRecord.from_json(line)
            except (ValueError, TypeError):
                continue  # a torn last line: its request was never acknowledged

    def append(self, record: UsageRecord) -> int:
        """Writes the record durably (against process death); returns its segment for ``stored()``."""
        data = (record.to_json() + "\n").encode()
        with self._lock:
            if self._closed:  # a straggler after the ledger closed: a segment of its own, replayed at next start
                self._closed = False
                self._segment += 1
                self._fd = self._open(self._segment)
            os.write(self._fd, data)
            if self.fsync:
                os.fsync(self._fd)
            segment = self._segment
            self._appended[segment] += 1
            if self._appended[segment] >= _SEGMENT_RECORDS:
                os.close(self._fd)
                self._segment += 1
                self._fd = self._open(self._segment)
            return segment

    def stored(self, segments: list[int]) -> None:
        """Marks records as in the database; deletes closed segments that are fully stored."""
        with self._lock:
            for segment in segments:
                self._stored[segment] += 1
            for segment in [s for s in self._appended if s != self._segment]:
                if self._stored[segment] >= self._appended[segment]:
                    self._path(segment).unlink(missing_ok=True)
                    del self._appended[segment], self._stored[segment]

    def close(self, all_stored: bool) -> None:
        with self._lock:
            self._closed = True
            os.close(self._fd)
            if all_stored:
                for segment in list(self._appended):
                    self._path(segment).unlink(missing_ok=True)
