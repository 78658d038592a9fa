"""The SQLite history: schema and migrations, the writer connection, and the reads the web serves.

One file in WAL mode: the journal worker and the ops CLI write it (one short transaction at a time),
the web processes only read it through read-only connections. Money columns are integer micro-units;
timestamps are ISO 8601 UTC strings, with `*_ms` integers beside them where a rebuild of the live
ledger needs the exact instant back.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .money import iso_ms

__all__ = [
    "HISTORY_COLUMNS",
    "METERING_COLUMNS",
    "SCHEMA_VERSION",
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

_V1 = """
CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    email TEXT,                       -- NULL once closed
    google_sub TEXT,                  -- NULL once closed (and for accounts made by ops)
    status TEXT NOT NULL CHECK (status IN ('active', 'closed')),
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    closed_at TEXT,
    closed_ms INTEGER,
    low_threshold_micro INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE account_totals (
    account_id TEXT PRIMARY KEY REFERENCES accounts (account_id),
    credited INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    consumed INTEGER NOT NULL DEFAULT 0,
    refunded INTEGER NOT NULL DEFAULT 0,
    forfeited INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    key_hash TEXT NOT NULL,           -- SHA-256 of the key; the key itself is never stored
    prefix TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_at TEXT,
    revoked_ms INTEGER,
    last_used_at TEXT,
    last_used_ms INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);
CREATE TABLE buckets (
    bucket_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (account_id),
    amount_micro INTEGER NOT NULL,
    remaining_micro INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    reference TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX buckets_account ON buckets (account_id, expires_ms);
CREATE TABLE reservations (
    request_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    key_id TEXT NOT NULL DEFAULT '',
    held_micro INTEGER NOT NULL,
    draws TEXT NOT NULL DEFAULT '',   -- as the Lua encodes them: "bucket:amount,bucket:amount"
    status TEXT NOT NULL CHECK (status IN ('open', 'settled', 'released')),
    reason TEXT,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_at TEXT,
    finished_ms INTEGER,
    deadline_ms INTEGER NOT NULL DEFAULT 0,
    charged_micro INTEGER,
    shortfall_micro INTEGER,
    final_draws TEXT
);
CREATE INDEX reservations_open ON reservations (status, account_id);
CREATE TABLE metering (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT,
    provider TEXT,
    upstream_model TEXT,
    input_cache_hit_tokens INTEGER NOT NULL DEFAULT 0,
    input_cache_miss_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    charge_micro INTEGER NOT NULL,
    draws TEXT NOT NULL,              -- JSON [{"bucket_id", "amount_micro"}]
    status TEXT,
    started_at TEXT,
    finished_at TEXT,
    latency_ms INTEGER,
    shortfall_micro INTEGER NOT NULL DEFAULT 0,
    estimated INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    finished_ms INTEGER NOT NULL
);
CREATE INDEX metering_account ON metering (account_id, seq);
CREATE INDEX metering_account_time ON metering (account_id, finished_ms);
CREATE TABLE refunds (
    refund_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    bucket_id TEXT NOT NULL,
    amount_micro INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('taken', 'confirmed', 'reverted')),
    external_ref TEXT,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_at TEXT
);
CREATE INDEX refunds_account ON refunds (account_id);
CREATE TABLE forfeitures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    bucket_id TEXT NOT NULL,
    amount_micro INTEGER NOT NULL,
    at TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX forfeitures_account ON forfeitures (account_id);
CREATE TABLE low_balance_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    available_micro INTEGER NOT NULL,
    threshold_micro INTEGER NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TABLE journal_cursor (
    shard INTEGER PRIMARY KEY,
    last_id TEXT NOT NULL
);
"""

# Top-ups (Omise charges on their way to buckets): ids, amounts, status, Omise's reason, times.
# Never card numbers, names on cards or CVVs: Omise keeps those; we only ever see a token id.
_V2 = """
CREATE TABLE topups (
    topup_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    amount_micro INTEGER NOT NULL,
    amount_minor INTEGER NOT NULL,    -- what Omise charged, in the smallest currency unit (satang)
    currency TEXT NOT NULL,
    method TEXT NOT NULL,             -- card | promptpay
    status TEXT NOT NULL CHECK (status IN ('pending', 'successful', 'failed', 'expired')),
    charge_id TEXT,                   -- Omise's chrg_...; NULL until Omise answered
    failure_code TEXT,
    failure_message TEXT,
    bucket_id TEXT,
    created_at TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX topups_account ON topups (account_id, created_ms);
CREATE INDEX topups_status ON topups (status, created_ms);
"""

# Each entry upgrades from the version before it; never edit a shipped one, append a new one.
_MIGRATIONS: tuple[str, ...] = (_V1, _V2)
SCHEMA_VERSION = len(_MIGRATIONS)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")


def connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection for the web processes (they never write the history)."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    _configure(conn)
    return conn


class Store:
    """The history file. Writes go through one connection guarded by a lock; call from a thread
    (asyncio.to_thread) when on an event loop: sqlite3 blocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    # ----- connections ----------------------------------------------------------------------
    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            Path(self.path).resolve().parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            _configure(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL, not NORMAL: the journal stream is trimmed right after a commit, so a commit that a
            # power cut could undo would lose events for good.
            conn.execute("PRAGMA synchronous = FULL")
            # Erased personal data (a closed account's email and sub) is overwritten with zeros in
            # the page, not left in free space; forget_erased then empties the WAL that held it.
            conn.execute("PRAGMA secure_delete = ON")
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def forget_erased(self) -> bool:
        """After an erasure (account closure) is committed: copy the WAL into the database and
        truncate it to zero bytes, so the erased values are in no file's bytes (db, -wal, -shm).
        Waits a moment for readers; False if one held on (a Litestream process holds a read
        transaction on purpose and checkpoints itself: see README), and the worker tries again later."""
        with self._lock:
            conn = self._writer()
            conn.execute("PRAGMA busy_timeout = 500")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute("PRAGMA busy_timeout = 30000")
        if busy:
            log.warning("WAL checkpoint after an erasure was blocked by a reader; retrying later")
        return not busy

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in one BEGIN IMMEDIATE transaction (the write lock is taken up front, so a second
        writer waits here rather than failing at its first write); commit, or roll back on error."""
        with self._lock:
            conn = self._writer()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        conn = connect_readonly(self.path)
        try:
            yield conn
        finally:
            conn.close()

    # ----- schema ---------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent. Returns the schema version."""

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema {version} is newer than this code ({SCHEMA_VERSION})")
            for script in _MIGRATIONS[version:]:
                for statement in _split_sql(script):
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            return SCHEMA_VERSION

        return self.write(run)

    # ----- audit log ------------------------------------------------------------------------
    def audit(self, *, actor: str, action: str, target: str, detail: dict[str, Any], at_ms: int) -> int:
        """Append an operator action (ids and amounts only). Returns its row id."""

        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                (iso_ms(at_ms), actor, action, target, orjson.dumps(detail).decode()),
            )
            return int(cur.lastrowid or 0)

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
                "sum(input_cache_hit_tokens) AS input_cache_hit_tokens, "
                "sum(input_cache_miss_tokens) AS input_cache_miss_tokens, "
                "sum(output_tokens) AS output_tokens, sum(charge_micro) AS charge_micro "
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
                f"SELECT * FROM ({_HISTORY_SQL}) WHERE (at_ms, event_id) < (:t, :e) "
                "ORDER BY at_ms DESC, event_id DESC LIMIT :n",
                {"a": account_id, "t": at_ms, "e": event_id, "n": limit},
            ).fetchall()
        return [_history_row(r, with_cursor=True) for r in rows]

    def iter_history(self, account_id: str, *, chunk: int = 500) -> Iterator[dict[str, Any]]:
        """Every money event of the account, oldest first, read in chunks (for a streamed export)."""
        at_ms, event_id = -1, ""
        while True:
            with self.reader() as conn:
                rows = conn.execute(
                    f"SELECT * FROM ({_HISTORY_SQL}) WHERE (at_ms, event_id) > (:t, :e) "
                    "ORDER BY at_ms, event_id LIMIT :n",
                    {"a": account_id, "t": at_ms, "e": event_id, "n": chunk},
                ).fetchall()
            for r in rows:
                yield _history_row(r, with_cursor=False)
            if len(rows) < chunk:
                return
            at_ms, event_id = int(rows[-1]["at_ms"]), str(rows[-1]["event_id"])

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """A read for the ledger's own tools (reconcile, rebuild)."""
        with self.reader() as conn:
            return conn.execute(sql, params).fetchall()


def _metering_row(r: sqlite3.Row, *, with_seq: bool) -> dict[str, Any]:
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
SELECT f.at_ms, 'forfeit:' || printf('%012d', f.id), 'forfeit',
       CASE WHEN b.expires_ms IS NULL OR f.at_ms >= b.expires_ms THEN 'expired' ELSE 'account_closed' END,
       f.amount_micro, -f.amount_micro, f.bucket_id, b.source, b.expires_at, NULL, NULL, NULL, NULL
  FROM forfeitures f LEFT JOIN buckets b ON b.bucket_id = f.bucket_id
 WHERE f.account_id = :a
"""

_SOURCE_LABELS = {"topup": "Top-up", "grant": "Grant", "trial": "Trial credit"}


def _describe(r: sqlite3.Row) -> str:
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


def _history_row(r: sqlite3.Row, *, with_cursor: bool) -> dict[str, Any]:
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


def _split_sql(script: str) -> list[str]:
    """Statements of a migration; triggers hold ';' inside BEGIN..END, so split on complete ones."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not buf.strip():
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
