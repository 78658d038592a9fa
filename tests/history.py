"""Which engine the tests keep the history in: SQLite files (the default) or PostgreSQL.

HISTORY_DB=postgres runs the history-touching tests against PostgreSQL: HISTORY_PG_URL (default
postgres@127.0.0.1:5432) gets one database for the session, and every history a test opens is a
schema of its own in it (the URL's search_path), dropped with the database at the end.
`./scripts/test` runs those modules a second time that way.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

HISTORY_DB = os.environ.get("HISTORY_DB", "sqlite")
POSTGRES = HISTORY_DB == "postgres"
PG_SERVER_URL = os.environ.get("HISTORY_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_session_db: str | None = None


def _server(dbname: str) -> str:
    base, _, _ = PG_SERVER_URL.rpartition("/")
    return f"{base}/{dbname}"


def _admin(sql: str, dbname: str = "") -> None:
    import psycopg

    url = _server(dbname) if dbname else PG_SERVER_URL
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.encode())


def session_database() -> str:
    global _session_db
    if _session_db is None:
        name = f"cp_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        _admin(f'CREATE DATABASE "{name}"')
        _session_db = name
    return _session_db


def drop_session_database() -> None:
    global _session_db
    if _session_db is not None:
        _admin(f'DROP DATABASE IF EXISTS "{_session_db}" WITH (FORCE)')
        _session_db = None


def new_postgres_history() -> str:
    """A fresh, empty PostgreSQL history: a schema of its own in the session's database."""
    db = session_database()
    schema = f"h_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE SCHEMA "{schema}"', db)
    return _server(db) + "?options=" + quote(f"-csearch_path={schema}", safe="")


def history_target(tmp_path: Path, name: str = "gateway.sqlite3") -> str:
    """What a test's Store opens: a SQLite file under tmp_path, or a fresh PostgreSQL schema."""
    return new_postgres_history() if POSTGRES else str(tmp_path / name)


def history_url(tmp_path: Path) -> str | None:
    """Settings.database_url for a test gateway (None: SQLite at its database_path)."""
    return new_postgres_history() if POSTGRES else None


def history_env(tmp_path: Path) -> dict[str, str]:
    """The environment that points `python -m ledger`/`gateway` at the test's history."""
    env = {"DATABASE_PATH": str(tmp_path / "gateway.sqlite3")}
    if POSTGRES:
        env["DATABASE_URL"] = new_postgres_history()
    return env


def env_target(env: dict[str, str]) -> str:
    return env.get("DATABASE_URL") or env["DATABASE_PATH"]


def rows(target: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """A read of the history as another process would make it (its own connection)."""
    from ledger.store import Store

    store = Store(str(target))
    try:
        return store.query(sql, params)
    finally:
        store.close()


def execute(target: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """A write behind the ledger's back (corrupting a row for a test), committed."""
    from ledger.store import Store

    store = Store(str(target))
    try:
        store.write(lambda conn: conn.execute(sql, params))
    finally:
        store.close()


def history_dump(target: str | Path) -> list[str]:
    """Every value of every row of every table of the history (and SQLite's schema text), as strings."""
    target = str(target)
    if target.startswith("postgresql://"):
        tables = [
            r[0]
            for r in rows(
                target,
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            )
        ]
        out: list[str] = []
        for table in tables:
            for row in rows(target, f'SELECT * FROM "{table}"'):
                out += ["" if v is None else str(v) for v in row]
        return out
    import sqlite3

    conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
    try:
        out = [repr(r) for r in conn.execute("SELECT * FROM sqlite_master")]
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                out += ["" if v is None else str(v) for v in row]
        return out
    finally:
        conn.close()
