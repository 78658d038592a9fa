"""Reconcile is green after a real workload and red when either side is corrupted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.ledger import Ledger
from ledger.reconcile import check_redis, check_sqlite, drain_all, history_name, reconcile
from ledger.store import Store
from tests import history
from tests.history import history_target
from tests.test_journal import THB, metering, run_workload

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(history_target(tmp_path))
    s.migrate()
    yield s
    s.close()


async def test_green_after_workload(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    report = await reconcile(ledger, store)
    assert report.ok and report.problems == []
    assert report.accounts == 3
    assert report.as_json() == {"ok": True, "accounts": 3, "problems": []}
    # Still green with an open reservation settled after the drain, once drained again.
    await ledger.settle(w.active, w.open_request, THB, metering=metering(w.open_request, w.key_id))
    assert (await reconcile(ledger, store)).ok


async def test_expired_credit_counts_as_forfeited_before_the_sweep(
    ledger: Ledger, clock, store: Store
) -> None:
    acct, _ = await ledger.create_account("exp@example.com")
    await ledger.credit(acct, 2 * THB, reference="exp_1", source="grant", life_s=60)
    await ledger.reserve(acct, "req_00e1", THB)
    clock.advance(61)  # expired, not swept: its remaining is forfeited in all but name
    assert await check_redis(ledger) == []
    assert (await reconcile(ledger, store)).ok
    await ledger.release(acct, "req_00e1")  # gives back into the expired bucket: forfeited at once
    await ledger.expire()
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    assert store.query("SELECT forfeited FROM account_totals")[0][0] == 2 * THB


async def test_red_when_a_bucket_remaining_is_changed_in_redis(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    assert (await reconcile(ledger, store)).ok
    bucket = next(b for b in await ledger.buckets(w.active) if b.remaining_micro > 0)
    await ledger.redis.hincrby(
        ledger.keys.pfx_for(bucket.bucket_id) + "b:" + bucket.bucket_id, "remaining", 7
    )
    report = await reconcile(ledger, store)
    assert not report.ok
    assert any(p.startswith(f"redis {w.active}: credited") for p in report.problems)
    assert any(bucket.bucket_id in p and "redis amount/remaining" in p for p in report.problems)
    assert all("@" not in p for p in report.problems)  # ids and numbers only, no emails


async def test_red_when_a_metering_row_is_deleted(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    assert (await reconcile(ledger, store)).ok
    history.execute(store.path, "DELETE FROM metering WHERE request_id = 'req_00a2'")
    problems = check_sqlite(store, now_ms=ledger.now_ms())
    h = history_name(store)  # the messages name the engine: "sqlite" or "postgresql"
    assert problems == [f"{h} {w.active}: consumed 17000000 != sum of metering charges 3000000"]
    assert h == ("postgresql" if store.postgres else "sqlite")
    report = await reconcile(ledger, store)
    assert not report.ok and report.problems == problems


async def test_red_when_sqlite_totals_or_reservations_drift(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    await drain_all(ledger, store)
    history.execute(store.path, "UPDATE account_totals SET reserved = reserved + 1 WHERE account_id = ?", (w.other,))
    report = await reconcile(ledger, store)
    h = history_name(store)
    assert f"{w.other}: reserved redis 0 != {h} 1" in report.problems
    assert f"{h} {w.other}: reserved 1 != held by open reservations 0" in report.problems


async def test_red_when_a_redis_reservation_vanishes(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    pfx = ledger.keys.pfx_for(w.active)
    await ledger.redis.zrem(pfx + "rz", w.open_request)
    problems = await check_redis(ledger)
    assert problems == [f"redis {w.active}: reserved {2 * THB} != held by open reservations 0"]
    assert not (await reconcile(ledger, store)).ok
