"""The two engines the history runs on: SQLite (a file, the default) and PostgreSQL (DATABASE_URL).

A thin layer of our own, not an ORM: the history's SQL is written once, in the subset both engines
speak (`?` and `:name` placeholders, `ON CONFLICT`, `RETURNING`, row values), and the PostgreSQL
side rewrites only the placeholders. What differs for real (connections, the write lock, DDL types,
triggers, what erasing leaves behind) lives in the two engine classes below.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg
import psycopg_pool

__all__ = [
    "UNAVAILABLE",
    "Conn",
    "Cursor",
    "Engine",
    "PostgresEngine",
    "SqliteEngine",
    "is_postgres_url",
    "pg_sql",
]

# A read or write that failed because the database is away, locked past its timeout or not
# migrated yet: the web answers 503 and the worker tries again; anything else is a bug.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    psycopg.OperationalError,
    psycopg.errors.UndefinedTable,
    psycopg_pool.PoolTimeout,
)

# Every history writer (the journal worker, the ops CLI, migrate) takes this transaction-scoped
# lock first: writers run one at a time, as SQLite's BEGIN IMMEDIATE makes them, so re-reading the
# journal cursor inside the transaction is enough to apply a batch exactly once.
_WRITE_LOCK_KEY = 0x4C454447  # "LEDG"


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What the history's SQL runs on: SQLite-style placeholders, rows readable by index and name."""

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor: ...

    def defer(self, check: Callable[[], None]) -> None:
        """Run check (a look at a result, not a write) before the transaction commits."""


# ----- PostgreSQL's side of the SQL ---------------------------------------------------------------

_LITERAL = re.compile(r"('(?:[^']|'')*')")
_PLACEHOLDER = re.compile(r"\?|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """`?` -> `%s`, `:name` -> `%(name)s`, a literal `%` -> `%%` (psycopg's placeholders); string
    literals are left alone but for their `%`."""
    out = []
    for i, part in enumerate(_LITERAL.split(sql)):
        part = part.replace("%", "%%")
        if i % 2 == 0:  # outside a literal
            part = _PLACEHOLDER.sub(lambda m: f"%({m.group(1)})s" if m.group(1) else "%s", part)
        out.append(part)
    return "".join(out)


class _RowBase(tuple[Any, ...]):
    """A row readable as sqlite3.Row is: by position, by column name, and by dict(row)."""

    __slots__ = ()
    _index: dict[str, int] = {}  # noqa: RUF012 (set per column list by _row_class)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[_RowBase]:
    return type("Row", (_RowBase,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _pg_rows(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    cls = _row_class(tuple(d.name for d in desc))
    return cls


class _PgCursor:
    """A cursor of a pipelined transaction: its rows arrive when read; its rowcount, when asked
    for before anything synced it, syncs the pipeline first."""

    __slots__ = ("_cur", "_pipeline")

    def __init__(self, cur: psycopg.Cursor[Any], pipeline: psycopg.Pipeline | None) -> None:
        self._cur = cur
        self._pipeline = pipeline

    @property
    def rowcount(self) -> int:
        if self._cur.rowcount < 0 and self._pipeline is not None:
            self._pipeline.sync()
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)


class _PgConn:
    """In a write transaction the statements are pipelined (psycopg's pipeline mode): sent without
    waiting for each answer, so a batch of journal events costs a round trip per statement whose
    result is read (a cursor, a reservation, a metering look-up), not per statement. An error
    surfaces at the next read or at commit, and rolls the whole transaction back either way."""

    __slots__ = ("_c", "_pipeline", "deferred")

    def __init__(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline | None = None) -> None:
        self._c = conn
        self._pipeline = pipeline
        self.deferred: list[Callable[[], None]] = []

    def defer(self, check: Callable[[], None]) -> None:
        self.deferred.append(check)  # the first one that reads syncs the pipeline once for all

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        if not params:  # psycopg reads no placeholders (and no `%%`) in a statement without any
            return _PgCursor(self._c.execute(sql.encode()), self._pipeline)
        return _PgCursor(self._c.execute(pg_sql(sql).encode(), params), self._pipeline)


class _SqliteConn:
    __slots__ = ("_c",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def defer(self, check: Callable[[], None]) -> None:
        check()  # in process: the answer is already here

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Cursor:
        return self._c.execute(sql, params)


# ----- the engines ----------------------------------------------------------------------------------


class Engine(Protocol):
    name: str

    @contextmanager
    def transaction(self) -> Iterator[Conn]: ...
    @contextmanager
    def reader(self) -> Iterator[Conn]: ...
    def forget_erased(self) -> bool: ...
    def close(self) -> None: ...


def _configure_sqlite(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")


def connect_sqlite_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection for the web processes (they never write the history)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    _configure_sqlite(conn)
    return conn


class SqliteEngine:
    """One file in WAL mode: one writer connection guarded by a lock, a read-only connection per read."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self.path).resolve().parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            _configure_sqlite(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL, not NORMAL: the journal stream is trimmed right after a commit, so a commit that a
            # power cut could undo would lose events for good.
            conn.execute("PRAGMA synchronous = FULL")
            # Erased personal data (a closed account's email and sub) is overwritten with zeros in
            # the page, not left in free space; forget_erased then empties the WAL that held it.
            conn.execute("PRAGMA secure_delete = ON")
            self._conn = conn
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        """BEGIN IMMEDIATE: the write lock is taken up front, so a second writer waits here rather
        than failing at its first write."""
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteConn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def reader(self) -> Iterator[Conn]:
        conn = connect_sqlite_readonly(self.path)
        try:
            yield _SqliteConn(conn)
        finally:
            conn.close()

    def forget_erased(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes, so erased values are in no
        file's bytes (db, -wal, -shm). Waits a moment for readers; False if one held on (Litestream
        holds a read transaction on purpose and checkpoints itself: see README)."""
        with self._lock:
            conn = self._writer()
            conn.execute("PRAGMA busy_timeout = 500")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout = 30000")
        return not busy

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PostgresEngine:
    """One writer connection guarded by a lock (and the cluster-wide advisory lock in each write
    transaction, for writers in other processes); reads from a small pool, each statement its own
    transaction (autocommit), so a slow export never holds a snapshot open between its chunks."""

    name = "postgres"

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = url
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, row_factory=_pg_rows, connect_timeout=10)

    def _writer(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Conn]:
        with self._lock:
            conn = self._writer()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
                with conn.pipeline() as pipeline:
                    pg = _PgConn(conn, pipeline)
                    yield pg
                    for check in pg.deferred:
                        check()

    def _readers(self) -> psycopg_pool.ConnectionPool[Any]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self._pool_size,
                    kwargs={"autocommit": True, "row_factory": _pg_rows},
                    timeout=30,
                    open=True,
                )
            return self._pool

    @contextmanager
    def reader(self) -> Iterator[Conn]:
        with self._readers().connection() as conn:
            yield _PgConn(conn)

    def forget_erased(self) -> bool:
        """The erasing UPDATE left the old row version (email, sub) dead in the heap, where plain
        VACUUM would only mark its space reusable: VACUUM FULL rewrites `accounts` into a new file
        of live rows and drops the old one. It needs the table to itself for a moment: if a reader
        holds it past the lock timeout, False, and the worker tries again later. The WAL that
        carried the old version is recycled after checkpoints (README: PostgreSQL and erasure)."""
        with self._lock:
            conn = self._writer()
            try:
                conn.execute("SET lock_timeout = '2s'")
                conn.execute("VACUUM FULL accounts")
            except psycopg.errors.LockNotAvailable:
                return False
            finally:
                conn.execute("RESET lock_timeout")
        return True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
