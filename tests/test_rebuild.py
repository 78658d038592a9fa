"""After Redis loses the ledger, rebuild restores it from SQLite: reconcile is green, balances match."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.errors import KeyLimit, LedgerLost
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.rebuild import RebuildRefused, ledger_key_count, rebuild
from ledger.reconcile import drain_all, reconcile
from ledger.store import Store
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


async def flush_ledger(r: aioredis.Redis, keyspace: Keyspace) -> None:
    keys = [k async for k in r.scan_iter(match=keyspace.pattern(), count=1000)]
    await r.delete(*keys)


async def test_flush_rebuild_reconcile_green_and_balances_match(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    await drain_all(ledger, store)
    before = {a: await ledger.balance(a) for a in (w.active, w.other, w.closed)}
    infos = {a: await ledger.account(a) for a in (w.active, w.other, w.closed)}
    keys_before = await ledger.list_keys(w.active)

    await flush_ledger(ledger.redis, ledger.keys)
    assert await ledger_key_count(ledger) == 0
    with pytest.raises(LedgerLost):  # a lost ledger is not "no such key"
        await ledger.lookup_key(w.key)

    result = await rebuild(ledger, store, actor="ops-test")
    assert (result.accounts, result.buckets) == (3, 6)
    report = await reconcile(ledger, store)
    assert report.ok, report.problems

    for acct, bal in before.items():
        assert await ledger.balance(acct) == bal
        assert await ledger.account(acct) == infos[acct]
    assert await ledger.list_keys(w.active) == keys_before
    # The key made before the loss still authenticates; the revoked one does not resolve.
    ref = await ledger.lookup_key(w.key)
    assert ref is not None and (ref.account_id, ref.key_id) == (w.active, w.key_id)
    assert await ledger.find_account_by_sub(w.sub) == w.active
    assert (await ledger.create_account("again@example.com", sub=w.sub)) == (w.active, False)
    assert await ledger.account_ids() == sorted([w.active, w.other, w.closed])

    # Idempotency survives: the same top-up reference and a retried settle move nothing.
    again = await ledger.credit(w.active, 10 * THB, reference="top_1", source="topup")
    assert not again.created
    retried = await ledger.settle(w.active, "req_00a2", 14 * THB, metering=metering("req_00a2", w.key_id))
    assert retried.already and retried.charged_micro == 14 * THB
    # The limit of two live keys still holds, and the open reservation can still be settled.
    await ledger.create_key(w.active)
    with pytest.raises(KeyLimit):
        await ledger.create_key(w.active)
    done = await ledger.settle(
        w.active, w.open_request, 1_500_000, metering=metering(w.open_request, w.key_id)
    )
    assert done.charged_micro == 1_500_000 and not done.already
    # The sweep still finds expired credit (the other account's long bucket, a month on).
    clock.advance(31 * 24 * 3600)
    _, forfeited = await ledger.expire()
    assert forfeited > 0
    report = await reconcile(ledger, store)
    assert report.ok, report.problems

    audit = store.audit_rows()
    assert audit[0]["action"] == "rebuild" and audit[0]["actor"] == "ops-test"
    assert '"accounts":3' in audit[0]["detail"]


async def test_rebuild_refuses_over_a_live_ledger_unless_forced(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    await drain_all(ledger, store)
    with pytest.raises(RebuildRefused):
        await rebuild(ledger, store)
    assert store.audit_rows() == []
    # Forced: events not yet drained are drained first, then the ledger is replaced.
    await ledger.settle(w.active, w.open_request, THB, metering=metering(w.open_request, w.key_id))
    balance = await ledger.balance(w.active)
    await rebuild(ledger, store, force=True)
    assert store.cursors() == {}  # the old streams are gone with the old keys
    assert await ledger.balance(w.active) == balance
    assert store.query("SELECT count(*) FROM metering")[0][0] == 5
    report = await reconcile(ledger, store)
    assert report.ok, report.problems


async def test_events_after_rebuild_are_journaled_again(ledger: Ledger, clock, store: Store) -> None:
    acct, _ = await ledger.create_account("after@example.com")
    await ledger.credit(acct, 5 * THB, reference="after_1", source="grant")
    await drain_all(ledger, store)
    await flush_ledger(ledger.redis, ledger.keys)
    await rebuild(ledger, store)
    assert store.cursors() == {}
    await ledger.reserve(acct, "req_00f1", THB)
    await ledger.settle(acct, "req_00f1", 400_000, metering=metering("req_00f1", ""))
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    assert store.query("SELECT consumed FROM account_totals WHERE account_id = ?", (acct,))[0][0] == 400_000
    assert (await ledger.balance(acct)).available_micro == 5 * THB - 400_000
