"""A small synchronous database handle over SQLite (WAL) or PostgreSQL (psycopg 3).

SQL is written once with ``?`` placeholders and portable syntax (``ON CONFLICT``); the handle rewrites
placeholders for PostgreSQL. One connection per handle, guarded by a lock: callers are the gateway's event
loop (rare, cached lookups) and one background writer thread per handle.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PLACEHOLDER = re.compile(r"\?")


class Database:
    def __init__(self, url: str, *, read_only: bool = False) -> None:
        """``url`` is ``postgresql://...`` or a SQLite file path (``sqlite:///path`` also accepted);
        ``read_only`` opens a SQLite file that must exist, without write access (billing reads the ledger)."""
        self.url = url
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.RLock()
        self._conn: Any
        if self.is_postgres:
            import psycopg

            self._conn = psycopg.connect(url, autocommit=True)
            return
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        if read_only:
            self._conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=30
            )
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a process crash (SIGKILL); an OS crash may lose the last commits.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql) if self.is_postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the number of rows it changed."""
        with self._lock:
            cursor = self._conn.execute(self._sql(sql), tuple(params))
            return int(cursor.rowcount or 0)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            if self.is_postgres:
                with self._conn.cursor() as cursor:
                    cursor.executemany(self._sql(sql), [tuple(r) for r in rows])
            else:
                self._conn.executemany(sql, [tuple(r) for r in rows])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(self._sql(sql), tuple(params)).fetchall())

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """All statements inside commit together or not at all."""
        with self._lock:
            if self.is_postgres:
                with self._conn.transaction():
                    yield self
            else:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
