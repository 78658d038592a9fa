"""The history's two engines: the SQL both speak, the settings that pick one, and what only
PostgreSQL has (monthly metering partitions). The rest of the history's behaviour is tested by the
store, journal, rebuild, reconcile, CLI and web modules, run on both engines by ./scripts/test."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import orjson
import pytest

from gateway.settings import ConfigError as SettingsError
from gateway.settings import Settings
from ledger.config import ConfigError, LedgerConfig
from ledger.engines import pg_sql
from ledger.journal import apply_events
from ledger.schema import ensure_metering_partitions, month_partitions
from ledger.store import Store
from tests.history import history_target

MONTH_MS = 31 * 86_400_000


def test_placeholders_become_psycopgs_and_literals_stay() -> None:
    assert pg_sql("SELECT * FROM t WHERE a = ? AND b = ?") == "SELECT * FROM t WHERE a = %s AND b = %s"
    assert pg_sql("WHERE (at_ms, e) < (:t, :e) LIMIT :n") == "WHERE (at_ms, e) < (%(t)s, %(e)s) LIMIT %(n)s"
    # A literal keeps its '?' and ':word', a '%' anywhere is doubled, a '::' cast is no placeholder.
    assert pg_sql("SELECT 'a?b:c', x LIKE 'error:%', f.id::text FROM t WHERE y = ?") == (
        "SELECT 'a?b:c', x LIKE 'error:%%', f.id::text FROM t WHERE y = %s"
    )
    assert pg_sql("SELECT 'it''s ?' WHERE a = :a") == "SELECT 'it''s ?' WHERE a = %(a)s"


def test_database_url_picks_postgresql_and_nothing_else(tmp_path: Path) -> None:
    env = {"DATABASE_PATH": str(tmp_path / "h.sqlite3")}
    assert LedgerConfig.from_env(env).history_target == str(tmp_path / "h.sqlite3")
    url = "postgresql://gw@db.internal:5432/history"
    assert LedgerConfig.from_env({**env, "DATABASE_URL": url}).history_target == url
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        LedgerConfig.from_env({**env, "DATABASE_URL": "mysql://db/history"})
    settings = Settings.from_env({"DATABASE_URL": url})
    assert settings.history_target == url and url not in repr(settings)  # it may carry a password
    assert Settings.from_env({}).history_target == "var/gateway.sqlite3"
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        Settings.from_env({"DATABASE_URL": "/var/lib/history.db"})
    assert Store(url).postgres and not Store(str(tmp_path / "h.sqlite3")).postgres


def settled(req: str, ts: int, charged: int = 1_000) -> dict[str, str]:
    return {
        "t": "settled",
        "ts": str(ts),
        "account": "acc_00aaaaaaaaaaaaaaaa",
        "req": req,
        "held": "0",
        "charged": str(charged),
        "shortfall": "0",
        "draws": "",
        "metering": orjson.dumps({"model": "demo", "status": "ok", "output_tokens": 7}).decode(),
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(history_target(tmp_path))
    s.migrate()
    yield s
    s.close()


def test_a_request_is_metered_once_even_when_settled_twice(store: Store) -> None:
    """The journal's cursor makes a batch apply once; a second settle of the same request (under
    another stream id) still makes no second metering row, on either engine."""
    ts = 1_790_000_000_000
    events = [("1-0", settled("req_0001", ts)), ("2-0", settled("req_0001", ts + MONTH_MS))]
    assert store.write(lambda conn: apply_events(conn, 0, events)) == (2, "2-0")
    rows = store.query("SELECT request_id, finished_ms FROM metering")
    assert [tuple(r) for r in rows] == [("req_0001", ts)]
    assert store.write(lambda conn: apply_events(conn, 0, events)) == (0, "2-0")


def test_maintain_makes_nothing_on_sqlite_and_the_coming_months_on_postgres(store: Store) -> None:
    made = store.maintain()
    if store.postgres:
        assert made == []  # migrate made them already
        names = [n for n, _, _ in month_partitions(time.time_ns() // 1_000_000)]
        found = {r[0] for r in store.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        assert set(names) <= found
    else:
        assert made == [] and store.query("SELECT count(*) FROM metering")[0][0] == 0


def test_month_partitions_cover_whole_utc_months() -> None:
    # 2026-12-15: November to February, each from its first millisecond to the next month's.
    parts = month_partitions(1_797_292_800_000)
    assert [n for n, _, _ in parts] == ["metering_2026_11", "metering_2026_12", "metering_2027_01", "metering_2027_02"]
    assert parts[0][1] == 1_793_491_200_000  # 2026-11-01T00:00Z
    assert all(hi == nxt_lo for (_, _, hi), (_, nxt_lo, _) in itertools.pairwise(parts))


@pytest.mark.postgres_only
def test_metering_rows_land_in_their_month_and_leave_the_default_when_it_is_made(store: Store) -> None:
    """A row far ahead of every partition waits in the default one; making its month moves it
    there (as the worker's hourly upkeep does), and the table reads the same throughout."""
    far = 2_000_000_000_000  # 2033-05-18, beyond the months migrate made
    near = month_partitions(time.time_ns() // 1_000_000)[1][1] + 1_000  # this month
    events = [("1-0", settled("req_far1", far)), ("2-0", settled("req_near", near))]
    store.write(lambda conn: apply_events(conn, 0, events))

    def where() -> dict[str, str]:
        return {
            r[0]: r[1]
            for r in store.query("SELECT request_id, tableoid::regclass::text FROM metering ORDER BY request_id")
        }

    assert where()["req_far1"] == "metering_default"
    assert where()["req_near"].startswith("metering_20")
    made = store.write(lambda conn: ensure_metering_partitions(conn, far, ahead=0))
    assert "metering_2033_05" in made
    assert where()["req_far1"] == "metering_2033_05"
    assert store.query("SELECT count(*) FROM metering_default")[0][0] == 0
    # Newest first by seq, whichever partition holds a row.
    assert [r["request_id"] for r in store.usage_rows("acc_00aaaaaaaaaaaaaaaa")] == ["req_near", "req_far1"]
    # Made once: a second pass finds them all.
    assert store.write(lambda conn: ensure_metering_partitions(conn, far, ahead=0)) == []


def test_an_unknown_bucket_is_reported_after_the_batch_on_both_engines(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket update's row count is looked at before the commit (PostgreSQL pipelines the
    batch, so not at once): a forfeit from a bucket the history never saw still says so."""
    event = {"t": "forfeited", "ts": "1790000000000", "account": "acc_00aaaaaaaaaaaaaaaa", "bucket": "bkt_nowhere", "amount": "5"}
    with caplog.at_level("WARNING", logger="ledger.journal"):
        assert store.write(lambda conn: apply_events(conn, 0, [("1-0", event)])) == (1, "1-0")
    assert "journal names unknown bucket bkt_nowhere" in caplog.text
    assert store.query("SELECT forfeited FROM account_totals")[0][0] == 5
