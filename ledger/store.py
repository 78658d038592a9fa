"""The history: the writer's transactions and the reads the web serves, on either engine.

SQLite (one file in WAL mode, the default) or PostgreSQL (DATABASE_URL, for web processes on several
hosts): see engines.py for what differs and schema.py for the one schema. The journal worker and the
ops CLI write it (one short transaction at a time); the web processes only read it. Money columns are integer micro-units;
timestamps are ISO 8601 UTC strings, with `*_ms` integers beside them where a rebuild of the live
ledger needs the exact instant back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson

from .engines import UNAVAILABLE, Conn, Engine, PostgresEngine, SqliteEngine, is_postgres_url
from .engines import connect_sqlite_readonly as connect_readonly
from .money import iso_ms
from .schema import MIGRATIONS, SCHEMA_VERSION, ensure_metering_partitions, pg_statements, split_sql

__all__ = [
    "HISTORY_COLUMNS",
    "METERING_COLUMNS",
    "SCHEMA_VERSION",
    "UNAVAILABLE",
    "Store",
    "connect_readonly",
]

T = TypeVar("T")

log = logging.getLogger("ledger.store")

# The export's columns: SPEC section 7, then what we add beside it.
METERING_COLUMNS = (
    "request_id",
    "account_id",
    "key_id",
    "model",
    "provider",
    "upstream_model",
    "input_cache_hit_tokens",
    "input_cache_miss_tokens",
    "output_tokens",
    "charge_micro",
    "draws",
    "status",
    "started_at",
    "finished_at",
    "latency_ms",
    "shortfall_micro",
    "estimated",
    "cache_write_tokens",
)

# The credit history's columns (one row per money event; ids, amounts, statuses and times only).
HISTORY_COLUMNS = (
    "event_id",
    "at",
    "kind",  # credit | topup (an attempt that credited nothing) | refund | forfeit
    "status",
    "amount_micro",
    "delta_micro",  # what the event did to the account's credit: + credited, - refunded or forfeited
    "bucket_id",
    "source",
    "expires_at",
    "topup_id",
    "charge_id",
    "refund_id",
    "failure_code",
    "description",
)


class Store:
    """The history: a SQLite file (a path) or a PostgreSQL database (a postgresql:// URL).
    Writes go through one connection guarded by a lock, one transaction at a time; every call
    blocks, so call from a thread (asyncio.to_thread) when on an event loop."""

    def __init__(self, target: str) -> None:
        self.path = target  # the SQLite path or the PostgreSQL URL, as given
        self.engine: Engine = PostgresEngine(target) if is_postgres_url(target) else SqliteEngine(target)
        self.postgres = isinstance(self.engine, PostgresEngine)

    # ----- connections ----------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()

    def forget_erased(self) -> bool:
        """After an erasure (account closure) is committed: make the erased values leave the
        engine's files (SQLite: checkpoint and truncate the WAL; PostgreSQL: VACUUM the accounts
        table). False if a reader held on (SQLite), and the worker tries again later."""
        done = self.engine.forget_erased()
        if not done:
            log.warning("WAL checkpoint after an erasure was blocked by a reader; retrying later")
        return done

    def write(self, fn: Callable[[Conn], T]) -> T:
        """Run fn in one transaction that holds the history's write lock from its start (a second
        writer, in this process or another, waits); commit, or roll back on error."""
        with self.engine.transaction() as conn:
            return fn(conn)

    @contextmanager
    def reader(self) -> Iterator[Conn]:
        with self.engine.reader() as conn:
            yield conn

    # ----- schema ---------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent. Returns the schema version. On PostgreSQL
        also creates the metering partitions of the months around now."""

        def run(conn: Conn) -> int:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema {version} is newer than this code ({SCHEMA_VERSION})")
            for script in MIGRATIONS[version:]:
                for statement in split_sql(script):
                    for sql in pg_statements(statement) if self.postgres else [statement]:
                        conn.execute(sql)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            if self.postgres:
                ensure_metering_partitions(conn)
            return SCHEMA_VERSION

        return self.write(run)

    def maintain(self, now_ms: int | None = None) -> list[str]:
        """Periodic upkeep for the worker: on PostgreSQL, the metering partitions of the coming
        months (names created); nothing on SQLite."""
        if not self.postgres:
            return []
        return self.write(lambda conn: ensure_metering_partitions(conn, now_ms))

    # ----- audit log ------------------------------------------------------------------------
    def audit(self, *, actor: str, action: str, target: str, detail: dict[str, Any], at_ms: int) -> int:
        """Append an operator action (ids and amounts only). Returns its row id."""

        def run(conn: Conn) -> int:
            cur = conn.execute(
                "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?) RETURNING id",
                (iso_ms(at_ms), actor, action, target, orjson.dumps(detail).decode()),
            )
            return int(cur.fetchone()[0])

        return self.write(run)

    def audit_rows(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.reader() as conn:
            rows = conn.execute("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    # ----- journal cursors ------------------------------------------------------------------
    def cursors(self) -> dict[int, str]:
        with self.reader() as conn:
            return {int(r[0]): str(r[1]) for r in conn.execute("SELECT shard, last_id FROM journal_cursor")}

    def reset_cursors(self) -> None:
        self.write(lambda conn: conn.execute("DELETE FROM journal_cursor"))

    # ----- reads for the web ----------------------------------------------------------------
    def usage_rows(self, account_id: str, limit: int = 50, before: int | None = None) -> list[dict[str, Any]]:
        """One page of metering rows, newest first. Each row carries `seq`; pass the last row's seq
        as `before` for the next page."""
        limit = max(1, min(int(limit), 1000))
        with self.reader() as conn:
            rows = conn.execute(
                f"SELECT seq, {', '.join(METERING_COLUMNS)} FROM metering "
                "WHERE account_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (account_id, before if before is not None else 2**62, limit),
            ).fetchall()
        return [_metering_row(r, with_seq=True) for r in rows]

    def iter_usage(self, account_id: str, *, chunk: int = 500) -> Iterator[dict[str, Any]]:
        """Every metering row of the account, oldest first, read in chunks (for a streamed export)."""
        after = 0
        while True:
            with self.reader() as conn:
                rows = conn.execute(
                    f"SELECT seq, {', '.join(METERING_COLUMNS)} FROM metering "
                    "WHERE account_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (account_id, after, chunk),
                ).fetchall()
            for r in rows:
                yield _metering_row(r, with_seq=False)
            if len(rows) < chunk:
                return
            after = int(rows[-1]["seq"])

    def daily_totals(self, account_id: str, days: int = 30, *, now_ms: int) -> list[dict[str, Any]]:
        """Per day (UTC) and model over the last `days` days: requests, tokens and charge."""
        since = now_ms - int(days) * 86_400_000
        with self.reader() as conn:
            rows = conn.execute(
                "SELECT substr(finished_at, 1, 10) AS day, model, count(*) AS requests, "
                "CAST(sum(input_cache_hit_tokens) AS BIGINT) AS input_cache_hit_tokens, "
                "CAST(sum(input_cache_miss_tokens) AS BIGINT) AS input_cache_miss_tokens, "
                "CAST(sum(output_tokens) AS BIGINT) AS output_tokens, CAST(sum(charge_micro) AS BIGINT) AS charge_micro "
                "FROM metering WHERE account_id = ? AND finished_ms >= ? "
                "GROUP BY day, model ORDER BY day, model",
                (account_id, since),
            ).fetchall()
        return [dict(r) for r in rows]

    def history_rows(
        self, account_id: str, limit: int = 50, before: str | None = None
    ) -> list[dict[str, Any]]:
        """One page of money events, newest first. Each row carries `cursor`; pass the last row's
        as `before` for the next page (ValueError when it is not one of ours)."""
        limit = max(1, min(int(limit), 1000))
        at_ms, event_id = _parse_cursor(before) if before is not None else (2**62, "")
        with self.reader() as conn:
            rows = conn.execute(
                f"SELECT * FROM ({self._history_sql}) AS h WHERE (at_ms, {self._event_id}) < (:t, :e) "
                f"ORDER BY at_ms DESC, {self._event_id} DESC LIMIT :n",
                {"a": account_id, "t": at_ms, "e": event_id, "n": limit},
            ).fetchall()
        return [_history_row(r, with_cursor=True) for r in rows]

    def iter_history(self, account_id: str, *, chunk: int = 500) -> Iterator[dict[str, Any]]:
        """Every money event of the account, oldest first, read in chunks (for a streamed export)."""
        at_ms, event_id = -1, ""
        while True:
            with self.reader() as conn:
                rows = conn.execute(
                    f"SELECT * FROM ({self._history_sql}) AS h WHERE (at_ms, {self._event_id}) > (:t, :e) "
                    f"ORDER BY at_ms, {self._event_id} LIMIT :n",
                    {"a": account_id, "t": at_ms, "e": event_id, "n": chunk},
                ).fetchall()
            for r in rows:
                yield _history_row(r, with_cursor=False)
            if len(rows) < chunk:
                return
            at_ms, event_id = int(rows[-1]["at_ms"]), str(rows[-1]["event_id"])

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Any]:
        """A read for the ledger's own tools (reconcile, rebuild): rows readable by position and
        by column name, as sqlite3.Row. Write it in the SQL both engines speak (engines.py)."""
        with self.reader() as conn:
            return conn.execute(sql, params).fetchall()

    @property
    def _history_sql(self) -> str:
        # The forfeit's event id pads its row id so that ids sort as numbers (a stable cursor).
        return _HISTORY_SQL.format(
            padded_id="lpad(f.id::text, 12, '0')" if self.postgres else "printf('%012d', f.id)"
        )

    @property
    def _event_id(self) -> str:
        # Byte order on both engines (SQLite's own): the cursor compares as the page was sorted.
        return 'event_id COLLATE "C"' if self.postgres else "event_id"


def _metering_row(r: Any, *, with_seq: bool) -> dict[str, Any]:
    row = {c: r[c] for c in METERING_COLUMNS}
    row["draws"] = orjson.loads(r["draws"]) if r["draws"] else []
    row["estimated"] = bool(r["estimated"])
    if with_seq:
        row["seq"] = r["seq"]
    return row


# One row per money event, ordered by (at_ms, event_id): event ids are unique across the four
# kinds, so that pair is a stable paging cursor. A successful top-up is its bucket's credit row
# (joined by bucket id); only attempts that credited nothing are rows of their own. A refund is one
# row whose status moves (taken -> confirmed | reverted); a reverted one changed nothing in the end.
_HISTORY_SQL = """
SELECT b.created_ms AS at_ms, 'credit:' || b.bucket_id AS event_id, 'credit' AS kind,
       'credited' AS status, b.amount_micro, b.amount_micro AS delta_micro, b.bucket_id,
       b.source, b.expires_at, t.topup_id, t.charge_id, NULL AS refund_id, NULL AS failure_code
  FROM buckets b LEFT JOIN topups t ON t.bucket_id = b.bucket_id AND t.account_id = b.account_id
 WHERE b.account_id = :a
UNION ALL
SELECT updated_ms, 'topup:' || topup_id, 'topup', status, amount_micro, 0, NULL,
       'topup', NULL, topup_id, charge_id, NULL, failure_code
  FROM topups WHERE account_id = :a AND status IN ('failed', 'expired')
UNION ALL
SELECT created_ms, 'refund:' || refund_id, 'refund', status, amount_micro,
       CASE status WHEN 'reverted' THEN 0 ELSE -amount_micro END, bucket_id, NULL, NULL, NULL, NULL,
       refund_id,
       CASE WHEN status = 'reverted' AND external_ref LIKE 'error:%' THEN substr(external_ref, 7) END
  FROM refunds WHERE account_id = :a
UNION ALL
SELECT f.at_ms, 'forfeit:' || {padded_id}, 'forfeit',
       CASE WHEN b.expires_ms IS NULL OR f.at_ms >= b.expires_ms THEN 'expired' ELSE 'account_closed' END,
       f.amount_micro, -f.amount_micro, f.bucket_id, b.source, b.expires_at, NULL, NULL, NULL, NULL
  FROM forfeitures f LEFT JOIN buckets b ON b.bucket_id = f.bucket_id
 WHERE f.account_id = :a
"""

_SOURCE_LABELS = {"topup": "Top-up", "grant": "Grant", "trial": "Trial credit"}


def _describe(r: Any) -> str:
    """A line for people: built from the row's own ids, codes and times, nothing else."""
    kind, status = r["kind"], r["status"]
    if kind == "credit":
        label = _SOURCE_LABELS.get(r["source"], str(r["source"]).capitalize() or "Credit")
        return f"{label} credited to bucket {r['bucket_id']}; expires {r['expires_at']}"
    if kind == "topup":
        return f"Top-up {status} ({r['failure_code'] or 'no reason given'}); nothing was credited"
    if kind == "refund":
        if status == "confirmed":
            return f"Refund of unused credit from bucket {r['bucket_id']} paid back to the payment"
        if status == "reverted":
            code = r["failure_code"] or "refused"
            return f"Refund refused by the payment provider ({code}); the credit went back to the bucket"
        return "Refund in progress: the credit is out of the bucket, awaiting the payment provider"
    if status == "account_closed":
        return f"Unused credit of bucket {r['bucket_id']} forfeited when the account was closed"
    return f"Unused credit of bucket {r['bucket_id']} forfeited: the bucket expired"


def _history_row(r: Any, *, with_cursor: bool) -> dict[str, Any]:
    row: dict[str, Any] = {c: r[c] for c in HISTORY_COLUMNS if c not in ("at", "description")}
    row["at"] = iso_ms(int(r["at_ms"]))
    row["description"] = _describe(r)
    if with_cursor:
        row["cursor"] = f"{int(r['at_ms'])}:{r['event_id']}"
    return {c: row[c] for c in (*HISTORY_COLUMNS, *(("cursor",) if with_cursor else ()))}


def _parse_cursor(cursor: str) -> tuple[int, str]:
    at, sep, event_id = cursor.partition(":")
    if not sep or not at.isdigit() or len(at) > 15 or not event_id or len(cursor) > 200:
        raise ValueError("not a history cursor")
    return int(at), event_id

