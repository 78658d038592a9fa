"""The history's schema: one list of migrations for both engines.

The migrations are written in SQLite's dialect (they shipped that way and SQLite databases carry
them applied); PostgreSQL runs the same list, statement by statement, through `pg_statements`: the
integer columns become BIGINT (micro-units and milliseconds pass 2^31), AUTOINCREMENT ids become
BIGSERIAL, the audit log's triggers become a PL/pgSQL trigger, and `metering` becomes a table
partitioned by month of `finished_ms` (it grows ~0.74 GiB per million requests: README, Retention).
"""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import UTC, datetime

from .engines import Conn

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ensure_metering_partitions",
    "month_partitions",
    "pg_statements",
    "split_sql",
]

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
MIGRATIONS = _MIGRATIONS


def split_sql(script: str) -> list[str]:
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


# ----- PostgreSQL -----------------------------------------------------------------------------------

_PG_AUDIT_FUNCTION = """
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$
"""

# SQLite's statements that PostgreSQL says otherwise, by their first line.
_PG_INSTEAD = {
    "CREATE TRIGGER audit_log_no_update": [
        _PG_AUDIT_FUNCTION.strip(),
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
    ],
    "CREATE TRIGGER audit_log_no_delete": [
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE OR TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
    ],
}


def pg_statements(statement: str) -> list[str]:
    """One SQLite migration statement as PostgreSQL runs it."""
    first = statement.split("\n", 1)[0].strip()
    for head, instead in _PG_INSTEAD.items():
        if first.startswith(head):
            return instead
    sql = statement.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    if first.startswith("CREATE TABLE metering "):
        # A partitioned table's keys must hold the partition key: seq stays unique through its
        # sequence, and the journal applies a request's row once by looking it up first
        # (ledger/journal.py), so request_id needs no global unique index.
        sql = sql.replace("seq BIGSERIAL PRIMARY KEY", "seq BIGSERIAL NOT NULL")
        sql = sql.replace("request_id TEXT NOT NULL UNIQUE", "request_id TEXT NOT NULL")
        head, _, _ = sql.rstrip().rstrip(";").rpartition(")")
        sql = head.rstrip() + ",\n    PRIMARY KEY (seq, finished_ms)\n) PARTITION BY RANGE (finished_ms)"
        return [
            sql,
            "CREATE INDEX metering_request ON metering (request_id)",
            # Rows outside every month made so far (a clock far off, a month not yet created) land
            # here; ensure_metering_partitions moves them out when their month is created.
            "CREATE TABLE metering_default PARTITION OF metering DEFAULT",
        ]
    return [sql]


def _month_start(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)


def month_partitions(now_ms: int, *, behind: int = 1, ahead: int = 2) -> list[tuple[str, int, int]]:
    """(name, from_ms, to_ms) of the monthly metering partitions around now_ms."""
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    out = []
    for k in range(-behind, ahead + 1):
        m = now.year * 12 + now.month - 1 + k
        y, mo = divmod(m, 12)
        ny, nmo = divmod(m + 1, 12)
        out.append((f"metering_{y:04d}_{mo + 1:02d}", _month_start(y, mo + 1), _month_start(ny, nmo + 1)))
    return out


def ensure_metering_partitions(conn: Conn, now_ms: int | None = None, *, ahead: int = 2) -> list[str]:
    """Create the metering partitions of last month, this month and `ahead` months (PostgreSQL;
    in a write transaction). Rows the default partition holds for a new month move into it.
    Returns the names created."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    created = []
    for name, lo, hi in month_partitions(now_ms, ahead=ahead):
        if conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None:
            continue
        conn.execute(f"CREATE TABLE {name} (LIKE metering INCLUDING DEFAULTS)")
        conn.execute(
            f"WITH moved AS (DELETE FROM metering_default WHERE finished_ms >= ? AND finished_ms < ? "
            f"RETURNING *) INSERT INTO {name} SELECT * FROM moved",
            (lo, hi),
        )
        conn.execute(f"ALTER TABLE metering ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})")
        created.append(name)
    return created
