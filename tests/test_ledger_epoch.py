"""A ledger that lost its data knows it: scripts refuse, reads say "being restored", and `rebuild`
needs no --force, never strands a hold, and is safe with traffic running."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.epoch import LedgerState, epochs, history_in, mark_rebuilding, open_ledger
from ledger.errors import LedgerLost, UnknownAccount
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.rebuild import RebuildRefused, ledger_key_count, rebuild
from ledger.reconcile import drain_all, reconcile
from ledger.store import Store
from tests.conftest import no_history
from tests.test_journal import THB, metering, run_workload


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(str(tmp_path / "gateway.sqlite3"))
    s.migrate()
    yield s
    s.close()


async def lose_redis(r: aioredis.Redis, keyspace: Keyspace) -> None:
    """What a Redis restarted without persistence holds of the ledger: nothing."""
    keys = [k async for k in r.scan_iter(match=keyspace.pattern(), count=1000)]
    if keys:
        await r.delete(*keys)


async def test_every_script_refuses_on_a_lost_ledger_and_creates_nothing(ledger: Ledger, clock, store: Store) -> None:
    w = await run_workload(ledger, clock)
    await drain_all(ledger, store)
    await lose_redis(ledger.redis, ledger.keys)
    # The settlement of a stream that was in flight: before, it charged nothing and left a partial
    # account record behind; now it is refused (the proxy spools it) and writes no key at all.
    with pytest.raises(LedgerLost):
        await ledger.settle(w.active, w.open_request, THB, metering=metering(w.open_request, w.key_id))
    for attempt in (
        ledger.reserve(w.active, "req_00b1", THB),
        ledger.release(w.active, w.open_request),
        ledger.credit(w.active, THB, reference="lost_1", source="grant"),
        ledger.create_account("new@example.com", sub="google-sub-new"),
        ledger.create_key(w.active),
        ledger.revoke_key(w.key_id),
        ledger.expire(),
    ):
        with pytest.raises(LedgerLost):
            await attempt
    assert await ledger_key_count(ledger) == 0
    # Reads that find nothing say "being restored", not "no such key/account".
    for read in (ledger.lookup_key(w.key), ledger.account(w.active), ledger.find_account_by_sub(w.sub)):
        with pytest.raises(LedgerLost):
            await read
    assert await open_ledger(ledger, history_in(store)) is LedgerState.LOST
    assert await ledger_key_count(ledger) == 0  # a lost ledger is never re-created empty


async def test_open_ledger_creates_a_new_ledger_once_and_adopts_one_from_before_markers(
    ledger: Ledger, store: Store
) -> None:
    marks = await epochs(ledger)
    assert None not in marks and len(set(marks)) == 1
    assert await open_ledger(ledger, history_in(store)) is LedgerState.WHOLE
    assert await epochs(ledger) == marks
    acct, _ = await ledger.create_account("old@example.com")
    # A ledger written before epoch markers existed: keys but no markers.
    await ledger.redis.delete(*(ledger.keys.epoch(s) for s in ledger.keys.all_shards()))
    assert await open_ledger(ledger, no_history) is LedgerState.ADOPTED
    assert (await ledger.account(acct)) is not None
    # A rebuild that stopped half way is never adopted as whole.
    await ledger.redis.delete(*(ledger.keys.epoch(s) for s in ledger.keys.all_shards()))
    await mark_rebuilding(ledger, True)
    assert await open_ledger(ledger, no_history) is LedgerState.LOST
    await mark_rebuilding(ledger, False)


async def test_rebuild_after_loss_needs_no_force_and_returns_held_credit_to_its_requests(
    ledger: Ledger, clock, store: Store
) -> None:
    w = await run_workload(ledger, clock)
    await drain_all(ledger, store)
    before = await ledger.balance(w.active)
    assert before.reserved_micro > 0
    await lose_redis(ledger.redis, ledger.keys)
    # A leftover written by an older version against the empty Redis: rebuild clears it.
    await ledger.redis.hset(ledger.keys.pfx_for(w.active) + "a:" + w.active, "reserved", -5)
    assert await ledger.account(w.active) is None  # a fragment is no account (and no traceback)
    result = await rebuild(ledger, store, actor="ops-test")
    assert result.reservations == 1
    assert await ledger.balance(w.active) == before
    # The stream that was in flight settles onto its restored hold: charged, the rest released.
    done = await ledger.settle(w.active, w.open_request, 700_000, metering=metering(w.open_request, w.key_id))
    assert (done.charged_micro, done.already) == (700_000, False)
    after = await ledger.balance(w.active)
    assert after.reserved_micro == 0
    assert after.available_micro == before.available_micro + before.reserved_micro - 700_000
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    # Whole again: a second rebuild refuses without --force.
    with pytest.raises(RebuildRefused):
        await rebuild(ledger, store)
    assert [r["action"] for r in store.audit_rows()] == ["rebuild"]


async def test_forced_rebuild_with_traffic_running_loses_and_doubles_nothing(
    ledger: Ledger, store: Store
) -> None:
    acct, _ = await ledger.create_account("busy@example.com")
    await ledger.credit(acct, 100 * THB, reference="busy_1", source="grant")
    charged: dict[str, int] = {}
    stop = asyncio.Event()

    async def traffic(lane: int) -> None:
        n = 0
        while not stop.is_set():
            req = f"req_00{lane:02d}{n:06d}"
            n += 1
            try:
                await ledger.reserve(acct, req, 50_000)
            except LedgerLost:
                await asyncio.sleep(0.005)  # the gateway answers 503 here: nothing was held
                continue
            while True:  # the proxy's spool replays a refused settlement until the ledger is back
                try:
                    await ledger.settle(acct, req, 10_000 + lane, metering=metering(req, ""))
                    break
                except LedgerLost:
                    await asyncio.sleep(0.005)
            charged[req] = 10_000 + lane

    lanes = [asyncio.get_running_loop().create_task(traffic(i)) for i in range(4)]
    await asyncio.sleep(0.2)
    await rebuild(ledger, store, force=True)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*lanes)
    assert len(charged) > 10
    info = await ledger.account(acct)
    assert info is not None
    assert (info.consumed, info.reserved) == (sum(charged.values()), 0)
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    rows = store.query("SELECT count(*), sum(charge_micro) FROM metering")[0]
    assert (rows[0], rows[1]) == (len(charged), sum(charged.values()))


async def test_balance_of_a_damaged_account_record_is_a_refusal_not_a_traceback(ledger: Ledger) -> None:
    acct, _ = await ledger.create_account("damaged@example.com")
    await ledger.redis.hdel(ledger.keys.pfx_for(acct) + "a:" + acct, "status", "created_at")
    assert await ledger.account(acct) is None
    with pytest.raises(UnknownAccount):
        await ledger.balance(acct)
