"""The journal worker mirrors Redis into SQLite exactly once, across crashes and concurrent workers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ledger.journal import JournalWorker
from ledger.ledger import Ledger
from ledger.reconcile import drain_all, reconcile, redis_snapshot, sqlite_snapshot
from ledger.store import Store
from tests.history import history_target

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

THB = 1_000_000
HOUR_S = 3600


@dataclass
class Workload:
    """What a mixed workload left behind, for the tests to check against."""

    active: str
    other: str
    closed: str
    key: str  # a live API key of `active`
    key_id: str
    sub: str
    settled: list[str] = field(default_factory=list)
    open_request: str = ""


def metering(req: str, key_id: str, out: int = 5) -> dict[str, object]:
    return {
        "request_id": req,
        "key_id": key_id,
        "model": "demo",
        "provider": "local",
        "upstream_model": "demo-1",
        "input_cache_hit_tokens": 1,
        "input_cache_miss_tokens": 10,
        "output_tokens": out,
        "status": "ok",
        "started_at": "2026-09-21T10:00:00.000Z",
        "finished_at": "2026-09-21T10:00:01.500Z",
        "latency_ms": 1500,
        "some_future_field": [1, 2],
    }


async def run_workload(ledger: Ledger, clock) -> Workload:
    """Every event type, including give-backs into a bucket that expired meanwhile."""
    sub = "google-sub-123"
    active, _ = await ledger.create_account("active@example.com", sub=sub, low_threshold_micro=5 * THB)
    other, _ = await ledger.create_account("other@example.com")
    closed, _ = await ledger.create_account("closed@example.com")
    key = await ledger.create_key(active)
    spare = await ledger.create_key(active)
    await ledger.revoke_key(spare.key_id)
    other_key = await ledger.create_key(other)
    w = Workload(active=active, other=other, closed=closed, key=key.key, key_id=key.key_id, sub=sub)

    await ledger.credit(active, 10 * THB, reference="top_1", source="topup", life_s=24 * HOUR_S)
    await ledger.credit(active, 20 * THB, reference="top_2", source="topup")
    await ledger.credit(other, 5 * THB, reference="grant_1", source="grant", life_s=HOUR_S)
    await ledger.credit(other, 3 * THB, reference="grant_2", source="grant")
    await ledger.credit(closed, 4 * THB, reference="grant_3", source="grant")

    # Surplus goes back; an overrun draws from the next bucket; a release returns everything.
    await ledger.reserve(active, "req_00a1", 3 * THB, key_id=key.key_id)
    await ledger.settle(active, "req_00a1", 2_500_000, metering=metering("req_00a1", key.key_id))
    await ledger.reserve(active, "req_00a2", 12 * THB, key_id=key.key_id)
    await ledger.settle(active, "req_00a2", 14 * THB, metering=metering("req_00a2", key.key_id))
    await ledger.reserve(active, "req_00a3", 1 * THB, key_id=key.key_id)
    await ledger.release(active, "req_00a3", reason="client_disconnect")
    # Settled with no reservation at all: fresh draws.
    await ledger.settle(active, "req_00a4", 500_000, metering=metering("req_00a4", key.key_id))
    w.settled += ["req_00a1", "req_00a2", "req_00a4"]

    # Refunds: one paid out, one refused by the provider (credit goes back).
    await ledger.refund(
        active, (await ledger.buckets(active))[-1].bucket_id, refund_id="rfd_00aa01", amount_micro=THB
    )
    await ledger.finish_refund(active, "rfd_00aa01", ok=True, external_ref="rfnd_test_1")
    await ledger.refund(
        active, (await ledger.buckets(active))[-1].bucket_id, refund_id="rfd_00aa02", amount_micro=THB
    )
    await ledger.finish_refund(active, "rfd_00aa02", ok=False, external_ref="rfnd_test_2")

    # Give-backs into a bucket that expired while the requests ran: forfeited at once.
    await ledger.reserve(other, "req_00b1", 4 * THB, key_id=other_key.key_id)
    await ledger.reserve(other, "req_00b2", 2 * THB, key_id=other_key.key_id)
    clock.advance(2 * HOUR_S)
    await ledger.settle(other, "req_00b1", THB, metering=metering("req_00b1", other_key.key_id))
    await ledger.release(other, "req_00b2", reason="abandoned")
    w.settled.append("req_00b1")
    await ledger.set_low_threshold(other, 4 * THB)  # above its 3 left: a low-balance event

    # Closing forfeits what is left and revokes keys; the sweep forfeits expired credit.
    await ledger.create_key(closed)
    await ledger.close_account(closed)
    await ledger.credit(active, THB, reference="trial_1", source="trial", life_s=HOUR_S)
    clock.advance(24 * HOUR_S)
    await ledger.expire()

    await ledger.reserve(active, "req_00a5", 2 * THB, key_id=key.key_id)
    w.open_request = "req_00a5"
    return w


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(history_target(tmp_path))
    s.migrate()
    yield s
    s.close()


def sqlite_counts(store: Store) -> dict[str, int]:
    tables = (
        "accounts",
        "api_keys",
        "buckets",
        "reservations",
        "metering",
        "refunds",
        "forfeitures",
        "low_balance_events",
    )
    return {t: int(store.query(f"SELECT count(*) FROM {t}")[0][0]) for t in tables}


async def test_journal_mirrors_redis_after_mixed_workload(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    applied = await drain_all(ledger, store)
    assert applied > 30

    redis_side, sql_side = await redis_snapshot(ledger), sqlite_snapshot(store)
    assert set(redis_side) == set(sql_side) == {w.active, w.other, w.closed}
    for acct in redis_side:
        assert redis_side[acct].counters == sql_side[acct].counters
        assert redis_side[acct].buckets == sql_side[acct].buckets
        assert redis_side[acct].open_held == sql_side[acct].open_held
        assert redis_side[acct].live_keys == sql_side[acct].live_keys
    # Forfeits by give-back (other), by closing (closed) and by the sweep (active's day bucket).
    # other: 4 + 1 drawn from the hour bucket; 3 of the settle's surplus and 1 of the release came
    # back after it expired.
    assert redis_side[w.other].counters["forfeited"] == 4 * THB
    assert store.query("SELECT count(*) FROM forfeitures WHERE account_id = ?", (w.other,))[0][0] == 2
    assert redis_side[w.closed].counters["forfeited"] == 4 * THB
    assert redis_side[w.active].counters["forfeited"] == THB
    assert (await reconcile(ledger, store)).ok

    rows = store.usage_rows(w.active, limit=10)
    assert [r["request_id"] for r in rows] == ["req_00a4", "req_00a2", "req_00a1"]
    overrun = rows[1]
    assert overrun["charge_micro"] == 14 * THB
    assert sum(d["amount_micro"] for d in overrun["draws"]) == 14 * THB
    assert overrun["model"] == "demo" and overrun["output_tokens"] == 5 and overrun["latency_ms"] == 1500
    assert overrun["finished_at"] == "2026-09-21T10:00:01.500Z"
    assert store.usage_rows(w.active, limit=1, before=rows[1]["seq"])[0]["request_id"] == "req_00a1"
    assert [r["request_id"] for r in store.iter_usage(w.active, chunk=2)] == [
        "req_00a1",
        "req_00a2",
        "req_00a4",
    ]
    daily = store.daily_totals(w.active, 30, now_ms=ledger.now_ms())
    assert sum(d["requests"] for d in daily) == 3 and {d["model"] for d in daily} == {"demo"}

    # Closing removed personal data for good; the money rows stay.
    closed = store.query("SELECT email, google_sub, status FROM accounts WHERE account_id = ?", (w.closed,))[
        0
    ]
    assert (closed["email"], closed["google_sub"], closed["status"]) == (None, None, "closed")
    active = store.query("SELECT email, google_sub FROM accounts WHERE account_id = ?", (w.active,))[0]
    assert (active["email"], active["google_sub"]) == ("active@example.com", w.sub)
    assert store.query("SELECT count(*) FROM buckets WHERE account_id = ?", (w.closed,))[0][0] == 1
    refunds = [tuple(r) for r in store.query("SELECT status, external_ref FROM refunds ORDER BY refund_id")]
    assert refunds == [("confirmed", "rfnd_test_1"), ("reverted", "rfnd_test_2")]
    assert store.query("SELECT last_used_at FROM api_keys WHERE key_id = ?", (w.key_id,))[0][0] is not None
    assert store.query("SELECT count(*) FROM low_balance_events")[0][0] >= 1
    # Only key hashes are stored.
    hashes = [r[0] for r in store.query("SELECT key_hash FROM api_keys")]
    assert all(len(h) == 64 for h in hashes) and w.key not in hashes
    # The streams were trimmed after the commit.
    for shard in ledger.keys.all_shards():
        assert await ledger.redis.xlen(ledger.keys.journal(shard)) == 0


async def test_crash_between_commit_and_ack_applies_each_event_once(
    ledger: Ledger, clock, store: Store
) -> None:
    await run_workload(ledger, clock)
    lengths = {s: await ledger.redis.xlen(ledger.keys.journal(s)) for s in ledger.keys.all_shards()}
    total_events = sum(lengths.values())

    class Crash(Exception):
        pass

    def crash(shard: int, cursor: str) -> None:
        raise Crash

    worker = JournalWorker(ledger.redis, ledger.keys, store, batch=7, after_commit=crash)
    with pytest.raises(Crash):
        await worker.drain_once()
    # The batch is in SQLite but the stream still holds it: nothing was acknowledged.
    after_crash = sqlite_counts(store)
    assert sum(after_crash.values()) > 0
    assert (
        sum([await ledger.redis.xlen(ledger.keys.journal(s)) for s in ledger.keys.all_shards()])
        == total_events
    )

    # Crash again and again on every batch, then restart without the fault.
    for _ in range(3):
        with pytest.raises(Crash):
            await worker.drain_once()
    restarted = JournalWorker(ledger.redis, ledger.keys, store, batch=7)
    while await restarted.drain_once():
        pass

    # Each event exactly once: SQLite's totals equal Redis's and the sums of its own rows.
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    counts = sqlite_counts(store)
    assert counts["metering"] == 4
    assert counts["accounts"] == 3 and counts["refunds"] == 2 and counts["buckets"] == 6
    assert counts["reservations"] == 7 and counts["forfeitures"] == 4 and counts["api_keys"] == 4
    assert store.query("SELECT count(DISTINCT request_id) FROM metering")[0][0] == 4


async def test_reapplying_a_committed_batch_applies_nothing(ledger: Ledger, clock, store: Store) -> None:
    await run_workload(ledger, clock)
    worker = JournalWorker(ledger.redis, ledger.keys, store)
    lengths = [await ledger.redis.xlen(ledger.keys.journal(s)) for s in ledger.keys.all_shards()]
    shard = lengths.index(max(lengths))
    raw = await ledger.redis.xrange(ledger.keys.journal(shard))
    events = [(i, dict(f)) for i, f in raw]
    applied, cursor = worker.apply_batch(shard, events)
    assert applied == len(events) and cursor == events[-1][0]
    before = sqlite_counts(store)
    assert worker.apply_batch(shard, events) == (0, cursor)
    assert sqlite_counts(store) == before


async def test_two_concurrent_workers_do_not_double_apply(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    second = Store(store.path)  # its own connection, as another process would have
    workers = [
        JournalWorker(ledger.redis, ledger.keys, store, batch=3),
        JournalWorker(ledger.redis, ledger.keys, second, batch=3),
    ]

    async def drain(worker: JournalWorker) -> int:
        total = 0
        while n := await worker.drain_once():
            total += n
        return total

    applied = await asyncio.gather(*(drain(x) for x in workers))
    assert sum(applied) > 30
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    assert store.query("SELECT count(*) FROM metering")[0][0] == len(w.settled)
    second.close()


async def test_worker_run_drains_sweeps_and_stops(ledger: Ledger, clock, store: Store) -> None:
    acct, _ = await ledger.create_account("run@example.com")
    await ledger.credit(acct, THB, reference="run_1", source="grant", life_s=60)
    await ledger.reserve(acct, "req_00c1", 500_000, ttl_s=1)
    clock.advance(120)  # the bucket expired and the reservation's holder is gone
    stop = asyncio.Event()
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    task = asyncio.create_task(worker.run(stop, interval_s=0.01))
    for _ in range(1000):  # up to 10 s on a loaded machine
        await asyncio.sleep(0.01)
        # No row until the worker's first pass has applied the account (slower on a cluster).
        row = store.query("SELECT forfeited FROM account_totals WHERE account_id = ?", (acct,))
        if row and row[0][0] == THB:
            break
    stop.set()
    await asyncio.wait_for(task, 5)
    totals = store.query("SELECT reserved, forfeited FROM account_totals WHERE account_id = ?", (acct,))[0]
    assert tuple(totals) == (0, THB)
    assert tuple(store.query("SELECT status, reason FROM reservations")[0]) == ("released", "abandoned")
    assert (await reconcile(ledger, store)).ok


def test_migrate_is_idempotent_and_versioned(tmp_path: Path) -> None:
    s = Store(history_target(tmp_path, "m.sqlite3"))
    assert s.migrate() == 2
    assert s.migrate() == 2
    assert s.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0] == "2"
    if s.postgres:  # metering is partitioned by month, this month's partition made by migrate
        this_month = time.strftime("metering_%Y_%m", time.gmtime())
        assert s.query("SELECT to_regclass(?) IS NOT NULL", (this_month,))[0][0] is True
    else:
        assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    s.close()


async def test_a_budgeted_pass_drains_a_backlog_in_batches_and_says_it_is_behind(
    ledger: Ledger, clock, store: Store
) -> None:
    # The worker drains in passes with a time budget so its health record stays fresh through a
    # long backlog; a zero budget is one committed batch per pass.
    await run_workload(ledger, clock)
    total = sum([await ledger.redis.xlen(ledger.keys.journal(s)) for s in ledger.keys.all_shards()])
    worker = JournalWorker(ledger.redis, ledger.keys, store, batch=3)
    passes, applied = 0, 0
    while True:
        n = await worker.drain_once(budget_s=0)
        passes += 1
        applied += n
        assert n <= 3
        if not worker.behind and n == 0:
            break
    assert applied == total and passes > total // 3
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
