"""A small synchronous database handle over SQLite (WAL) or PostgreSQL (psycopg 3 with a connection pool).

SQL is written once with ``?`` placeholders and portable syntax (``ON CONFLICT``); the handle rewrites
placeholders for PostgreSQL. Callers are worker threads (key lookups, admin and usage queries) and one
background writer thread per ledger; none of them share a connection with another thread at the same time:

- **PostgreSQL**: a ``psycopg_pool.ConnectionPool`` (1 to ``max_connections``). Each call takes a connection and
  checks it with an empty statement first; a dead one (backend terminated, server restarted) is discarded and
  the next one tried, so the first call after an outage gets a fresh connection instead of an error. The pool
  reconnects in the background with backoff (1 s, 2 s, …; a new series starts with the next call after
  ``timeout_s``). A call that cannot get a connection within ``timeout_s``, or whose connection drops during the
  statement, raises ``DatabaseUnavailable`` (an ``Unavailable``: UNAVAILABLE / 503); a read outside a
  transaction is retried once on a fresh connection first. Writes are not retried here: whether a statement
  cut off mid-flight committed is unknown, so the caller decides (the ledger's inserts are idempotent).
- **SQLite**: one writer connection behind a lock (SQLite has one writer anyway) and a small set of read
  connections handed out one per call; WAL lets readers run next to the writer and to each other, so a long
  admin query never holds a lock that a key lookup waits on.

``transaction()`` holds one connection (the writer, for SQLite) for its block; calls made inside it on the same
thread use that connection, and a nested ``transaction()`` joins the outer one.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from serving.errors import Unavailable

log = logging.getLogger("serving.database")

_PLACEHOLDER = re.compile(r"\?")
_RETRY_AFTER_S = 1.0
T = TypeVar("T")


class DatabaseUnavailable(Unavailable):
    """The database could not be reached, or dropped the connection during a statement. Transient: retry."""

    def __init__(self, message: str = "the database is unreachable; retry shortly") -> None:
        super().__init__(message, retry_after_s=_RETRY_AFTER_S)


class DuplicateRow(ValueError):
    """An insert hit a unique constraint (two writers raced past a check for the same name)."""


class _NoConnection(DatabaseUnavailable):
    """No live connection within the timeout (the server is down or keeps dropping them): not worth a retry."""


class _Postgres:
    def __init__(self, url: str, max_connections: int, timeout_s: float) -> None:
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:  # unless configured: its INFO lines come two per call
            pool_log.setLevel(logging.WARNING)
        self._max_connections = max_connections
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "connect_timeout": max(2, round(timeout_s))},
            timeout=timeout_s,
            # A failed background connect is retried with backoff (1 s, 2 s, …) for this long; then the next call
            # that waits starts a new series, so recovery after a long outage never waits out a long backoff.
            reconnect_timeout=max(timeout_s, 5.0),
            name="serving-db",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError:
            self._pool.close()
            psycopg.connect(url, connect_timeout=max(2, round(timeout_s))).close()  # raises the actual cause
            raise

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A live connection for this block. The pool's own ``check`` waits 1 s, 2 s, … between dead
        connections (6.5 s for 4 terminated ones, measured); here every dead one is dropped at once."""
        for _ in range(self._max_connections + 1):
            try:
                conn = self._pool.getconn()
            except PoolTimeout as exc:
                raise _NoConnection() from exc
            try:
                conn.execute("")  # one round trip: is this backend still there?
            except psycopg.Error:
                self._pool.putconn(conn)  # broken: the pool discards it and connects a replacement
                continue
            try:
                yield conn
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError) or conn.broken:
                    raise DatabaseUnavailable() from exc
                raise
            finally:
                self._pool.putconn(conn)
            return
        raise _NoConnection()  # more dead connections than the pool holds: the server keeps dropping them

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        self._pool.close()


class _SQLite:
    def __init__(self, path: Path, read_only: bool, max_idle_readers: int) -> None:
        self._path = path
        self._read_only = read_only
        self._max_idle_readers = max_idle_readers
        self._lock = threading.RLock()  # the writer connection; readers need no lock
        self._idle: list[sqlite3.Connection] = []
        self._idle_lock = threading.Lock()
        self._closed = False
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._open()
        if not read_only:
            self._writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives a process crash (SIGKILL); an OS crash may lose the last commits.
            self._writer.execute("PRAGMA synchronous=NORMAL")

    def _open(self) -> sqlite3.Connection:
        if self._read_only:
            conn = sqlite3.connect(
                f"file:{self._path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=30
            )
        else:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def writer(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._writer

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
            if not self._read_only:
                conn.execute("PRAGMA query_only=ON")
        try:
            yield conn
        finally:
            with self._idle_lock:
                keep = not self._closed and len(self._idle) < self._max_idle_readers
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def close(self) -> None:
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        with self._lock:
            self._writer.close()


class Database:
    def __init__(self, url: str, *, read_only: bool = False, max_connections: int = 8, timeout_s: float = 5.0) -> None:
        """``url`` is ``postgresql://...`` or a SQLite file path (``sqlite:///path`` also accepted);
        ``read_only`` opens a SQLite file that must exist, without write access (billing reads the ledger).
        ``max_connections`` bounds the PostgreSQL pool (and the idle SQLite readers kept); ``timeout_s`` is how
        long a call waits for a PostgreSQL connection before ``DatabaseUnavailable``."""
        self.url = url
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))
        self._tx = threading.local()  # .conn: the connection of the transaction open on this thread
        self._pg: _Postgres | None = None
        self._lite: _SQLite | None = None
        if self.is_postgres:
            self._pg = _Postgres(url, max_connections, timeout_s)
        else:
            path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
            self._lite = _SQLite(path, read_only, max_connections)

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql) if self.is_postgres else sql

    def _run(self, work: Callable[[Any], T], *, write: bool) -> T:
        """Runs ``work(connection)`` on this thread's transaction, else on a connection of its own."""
        conn = getattr(self._tx, "conn", None)
        if conn is not None:
            return work(conn)
        if self._pg is not None:
            if write:
                with self._pg.connection() as conn:
                    return work(conn)
            try:
                with self._pg.connection() as conn:
                    return work(conn)
            except _NoConnection:
                raise  # waiting again would only double the wait
            except DatabaseUnavailable:  # the connection dropped during the read: once more on a fresh one
                log.info("database connection dropped during a read; retrying once")
            with self._pg.connection() as conn:
                return work(conn)
        assert self._lite is not None
        try:
            with self._lite.writer() if write else self._lite.reader() as conn:
                return work(conn)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):  # still locked by another process after busy_timeout
                raise DatabaseUnavailable() from exc
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the number of rows it changed. A unique constraint it breaks raises
        ``DuplicateRow``, on SQLite and PostgreSQL alike."""
        statement = self._sql(sql)
        try:
            return self._run(lambda conn: int(conn.execute(statement, tuple(params)).rowcount or 0), write=True)
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateRow(str(exc)) from exc
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            raise DuplicateRow(str(exc)) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        statement, values = self._sql(sql), [tuple(r) for r in rows]

        def work(conn: Any) -> None:
            if self.is_postgres:
                with conn.cursor() as cursor:
                    cursor.executemany(statement, values)
            else:
                conn.executemany(statement, values)

        self._run(work, write=True)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        statement = self._sql(sql)
        return self._run(lambda conn: list(conn.execute(statement, tuple(params)).fetchall()), write=False)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """All statements inside commit together or not at all (on this thread; a nested block joins)."""
        if getattr(self._tx, "conn", None) is not None:
            yield self
            return
        backend: _Postgres | _SQLite | None = self._pg or self._lite
        assert backend is not None
        with backend.transaction() as conn:
            self._tx.conn = conn
            try:
                yield self
            finally:
                self._tx.conn = None

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._lite is not None:
            self._lite.close()
