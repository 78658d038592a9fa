"""The live ledger, operation by operation, on a real Redis and on fakeredis (conftest parametrizes both)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from ledger import keys as K
from ledger.errors import (
    AccountClosed,
    ConcurrencyLimit,
    InsufficientFunds,
    KeyLimit,
    LedgerError,
    NotRefundable,
    UnknownAccount,
    UnknownBucket,
    UnknownKey,
)
from ledger.ledger import DEFAULT_BUCKET_LIFE_S, Ledger
from ledger.scripts import SCRIPT_NAMES
from tests.conftest import Clock
from tests.ledger_invariants import check_conservation, scan_ledger

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

DAY_S = 24 * 3600


async def new_account(ledger: Ledger, email: str = "someone@example.com", **kw: object) -> str:
    account_id, created = await ledger.create_account(email, **kw)  # type: ignore[arg-type]
    assert created
    return account_id


def req(account_id: str) -> str:
    return K.new_request_id(K.shard_of(account_id))


async def remaining(ledger: Ledger, *bucket_ids: str) -> list[int]:
    out = []
    for bid in bucket_ids:
        b = await ledger.bucket(bid)
        assert b is not None
        out.append(b.remaining_micro)
    return out


async def available(ledger: Ledger, account_id: str) -> int:
    return (await ledger.balance(account_id)).available_micro


async def events(ledger: Ledger, account_id: str, kind: str) -> list[dict[str, str]]:
    stream = await ledger.redis.xrange(ledger.keys.journal(K.shard_of(account_id)))
    return [f for _, f in stream if f.get("t") == kind and f.get("account") == account_id]


async def conserved(ledger: Ledger) -> None:
    assert await check_conservation(ledger) == []


# ----- credit -----------------------------------------------------------------------------------


async def test_credit_creates_a_bucket_that_expires_in_30_days(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    c = await ledger.credit(acct, 5_000_000, reference="chrg_1", source="topup")
    assert c.created and c.amount_micro == 5_000_000
    assert c.expires_at == ledger.now_ms() + DEFAULT_BUCKET_LIFE_S * 1000
    b = await ledger.bucket(c.bucket_id)
    assert b is not None
    assert (b.amount_micro, b.remaining_micro, b.source, b.reference) == (
        5_000_000,
        5_000_000,
        "topup",
        "chrg_1",
    )
    assert await ledger.bucket_account(c.bucket_id) == acct
    assert await available(ledger, acct) == 5_000_000
    await conserved(ledger)


async def test_credit_is_idempotent_on_reference(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    first = await ledger.credit(acct, 5_000_000, reference="chrg_1", source="topup")
    clock.advance(10)
    again = await ledger.credit(acct, 9_000_000, reference="chrg_1", source="topup")
    assert not again.created
    assert (again.bucket_id, again.amount_micro, again.expires_at) == (
        first.bucket_id,
        5_000_000,
        first.expires_at,
    )
    info = await ledger.account(acct)
    assert info is not None and info.credited == 5_000_000
    assert len(await ledger.buckets(acct)) == 1
    assert len(await events(ledger, acct, "credited")) == 1
    await conserved(ledger)


async def test_credit_refused_on_closed_or_unknown_account(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.close_account(acct)
    with pytest.raises(AccountClosed):
        await ledger.credit(acct, 1_000_000, reference="chrg_late", source="topup")
    ghost = K.new_account_id(K.shard_of(acct))
    with pytest.raises(UnknownAccount):
        await ledger.credit(ghost, 1_000_000, reference="chrg_ghost", source="topup")
    with pytest.raises(ValueError):
        await ledger.credit(acct, 0, reference="chrg_zero", source="topup")
    info = await ledger.account(acct)
    assert info is not None and info.credited == 0
    await conserved(ledger)


# ----- reserve ----------------------------------------------------------------------------------


async def test_reserve_is_all_or_nothing_by_default(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="r1", source="grant")).bucket_id
    with pytest.raises(InsufficientFunds) as err:
        await ledger.reserve(acct, req(acct), 150)
    assert err.value.available_micro == 100
    assert await remaining(ledger, bid) == [100]
    assert await ledger.reserve(acct, req(acct), 60) == 60
    bal = await ledger.balance(acct)
    assert (bal.available_micro, bal.reserved_micro) == (40, 60)
    await conserved(ledger)


async def test_reserve_partial_holds_what_is_there_above_the_minimum(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="r1", source="grant")
    assert await ledger.reserve(acct, req(acct), 150, min_micro=50) == 100
    with pytest.raises(InsufficientFunds) as err:
        await ledger.reserve(acct, req(acct), 10, min_micro=5)
    assert err.value.available_micro == 0
    assert await available(ledger, acct) == 0
    await conserved(ledger)


async def test_reserve_is_idempotent_on_request_id(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="r1", source="grant")
    rid = req(acct)
    assert await ledger.reserve(acct, rid, 30) == 30
    assert await ledger.reserve(acct, rid, 30) == 30
    assert (await ledger.balance(acct)).reserved_micro == 30
    await ledger.settle(acct, rid, 30, metering={})
    with pytest.raises(LedgerError):
        await ledger.reserve(acct, rid, 30)
    await conserved(ledger)


async def test_reserve_refused_on_closed_or_unknown_account(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.close_account(acct)
    with pytest.raises(AccountClosed):
        await ledger.reserve(acct, req(acct), 1)
    ghost = K.new_account_id(K.shard_of(acct))
    with pytest.raises(UnknownAccount):
        await ledger.reserve(ghost, req(ghost), 1)


async def test_reserve_draws_the_soonest_expiring_bucket_first(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    mid = (
        await ledger.credit(acct, 30, reference="a", source="grant", expires_at_ms=now + 10 * DAY_S * 1000)
    ).bucket_id
    soon = (
        await ledger.credit(acct, 30, reference="b", source="grant", expires_at_ms=now + 5 * DAY_S * 1000)
    ).bucket_id
    late = (
        await ledger.credit(acct, 30, reference="c", source="grant", expires_at_ms=now + 20 * DAY_S * 1000)
    ).bucket_id
    await ledger.reserve(acct, req(acct), 20)
    assert await remaining(ledger, soon, mid, late) == [10, 30, 30]
    await ledger.reserve(acct, req(acct), 25)
    assert await remaining(ledger, soon, mid, late) == [0, 15, 30]
    await ledger.reserve(acct, req(acct), 40)
    assert await remaining(ledger, soon, mid, late) == [0, 0, 5]
    await conserved(ledger)


async def test_reserve_breaks_expiry_ties_to_the_older_bucket(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    expires = ledger.now_ms() + 7 * DAY_S * 1000
    older = (await ledger.credit(acct, 30, reference="a", source="grant", expires_at_ms=expires)).bucket_id
    clock.advance(1)
    newer = (await ledger.credit(acct, 30, reference="b", source="grant", expires_at_ms=expires)).bucket_id
    await ledger.reserve(acct, req(acct), 40)
    assert await remaining(ledger, older, newer) == [0, 20]
    await conserved(ledger)


async def test_expired_bucket_is_unusable_from_its_expiry_instant(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    short = (
        await ledger.credit(acct, 100, reference="a", source="grant", expires_at_ms=now + 10_000)
    ).bucket_id
    clock.advance(9)
    assert await available(ledger, acct) == 100
    clock.advance(1)  # exactly the expiry instant; no sweep has run
    assert ledger.now_ms() == now + 10_000
    assert await available(ledger, acct) == 0
    with pytest.raises(InsufficientFunds) as err:
        await ledger.reserve(acct, req(acct), 1)
    assert err.value.available_micro == 0
    # A charge with nothing reserved cannot reach it either: all of it is shortfall.
    s = await ledger.settle(acct, req(acct), 10, metering={})
    assert (s.charged_micro, s.shortfall_micro, s.draws) == (0, 10, [])
    assert await remaining(ledger, short) == [100]  # not yet swept, but counted as forfeited
    await conserved(ledger)


# ----- settle -----------------------------------------------------------------------------------


async def test_settle_returns_the_surplus_to_the_buckets_it_came_from(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    soon = (
        await ledger.credit(acct, 30, reference="a", source="grant", expires_at_ms=now + DAY_S * 1000)
    ).bucket_id
    late = (
        await ledger.credit(acct, 100, reference="b", source="grant", expires_at_ms=now + 9 * DAY_S * 1000)
    ).bucket_id
    rid = req(acct)
    assert await ledger.reserve(acct, rid, 50) == 50
    assert await remaining(ledger, soon, late) == [0, 80]
    s = await ledger.settle(acct, rid, 20, metering={"model": "m", "in": 3, "out": 4})
    assert (s.charged_micro, s.shortfall_micro, s.already) == (20, 0, False)
    # The charge stays on the soonest-expiring bucket; the later one gets all of its credit back.
    assert s.draws == [(soon, 20)]
    assert await remaining(ledger, soon, late) == [10, 100]
    info = await ledger.account(acct)
    assert info is not None and (info.reserved, info.consumed) == (0, 20)
    await conserved(ledger)


async def test_settle_overrun_draws_from_the_next_buckets(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    soon = (
        await ledger.credit(acct, 30, reference="a", source="grant", expires_at_ms=now + DAY_S * 1000)
    ).bucket_id
    late = (
        await ledger.credit(acct, 100, reference="b", source="grant", expires_at_ms=now + 9 * DAY_S * 1000)
    ).bucket_id
    rid = req(acct)
    await ledger.reserve(acct, rid, 20)
    s = await ledger.settle(acct, rid, 50, metering={})
    assert (s.charged_micro, s.shortfall_micro) == (50, 0)
    assert dict(s.draws) == {soon: 30, late: 20}
    assert await remaining(ledger, soon, late) == [0, 80]
    await conserved(ledger)


async def test_settle_shortfall_when_nothing_is_left_and_balance_never_negative(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="grant")
    rid = req(acct)
    await ledger.reserve(acct, rid, 80)
    s = await ledger.settle(acct, rid, 150, metering={})
    assert (s.charged_micro, s.shortfall_micro) == (100, 50)
    assert await available(ledger, acct) == 0
    info = await ledger.account(acct)
    assert info is not None and (info.consumed, info.reserved) == (100, 0)
    assert all(b.remaining_micro == 0 for b in await ledger.buckets(acct))
    await conserved(ledger)


async def test_settle_is_idempotent(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="grant")
    rid = req(acct)
    await ledger.reserve(acct, rid, 40)
    first = await ledger.settle(acct, rid, 25, metering={"n": 1})
    again = await ledger.settle(acct, rid, 99, metering={"n": 2})
    assert again.already and not first.already
    assert (again.charged_micro, again.shortfall_micro, again.draws) == (25, 0, first.draws)
    assert await available(ledger, acct) == 75
    assert len(await events(ledger, acct, "settled")) == 1
    assert await ledger.release(acct, rid) == 0  # a settled request cannot be released
    assert await available(ledger, acct) == 75
    await conserved(ledger)


async def test_late_settle_after_the_stale_sweep_draws_from_buckets(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="grant")
    rid = req(acct)
    await ledger.reserve(acct, rid, 50, ttl_s=60)
    assert await ledger.release_stale() == 0
    clock.advance(61)
    assert await ledger.release_stale() == 1  # its process stopped extending it: abandoned
    assert [e["req"] for e in await events(ledger, acct, "released")] == [rid]
    assert (await events(ledger, acct, "released"))[0]["reason"] == "abandoned"
    assert await available(ledger, acct) == 100
    s = await ledger.settle(acct, rid, 30, metering={})
    assert (s.charged_micro, s.shortfall_micro, s.already) == (30, 0, False)
    bal = await ledger.balance(acct)
    assert (bal.available_micro, bal.reserved_micro) == (70, 0)
    assert (await ledger.settle(acct, rid, 30, metering={})).already
    assert await ledger.release(acct, rid) == 0
    await conserved(ledger)


async def test_extend_keeps_a_long_reservation_from_the_stale_sweep(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="grant")
    rid = req(acct)
    await ledger.reserve(acct, rid, 50, ttl_s=60)
    clock.advance(50)
    await ledger.extend([(acct, rid)], ttl_s=60)
    clock.advance(50)
    assert await ledger.release_stale() == 0
    assert (await ledger.balance(acct)).reserved_micro == 50
    await ledger.settle(acct, rid, 10, metering={})
    await ledger.extend([(acct, rid)], ttl_s=60)  # XX: never resurrects a finished reservation
    clock.advance(120)
    assert await ledger.release_stale() == 0
    assert await available(ledger, acct) == 90
    await conserved(ledger)


# ----- release ----------------------------------------------------------------------------------


async def test_release_returns_every_micro_unit_to_its_bucket(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    soon = (
        await ledger.credit(acct, 30, reference="a", source="grant", expires_at_ms=now + DAY_S * 1000)
    ).bucket_id
    late = (
        await ledger.credit(acct, 100, reference="b", source="grant", expires_at_ms=now + 9 * DAY_S * 1000)
    ).bucket_id
    rid = req(acct)
    await ledger.reserve(acct, rid, 70)
    assert await remaining(ledger, soon, late) == [0, 60]
    assert await ledger.release(acct, rid) == 70
    assert await remaining(ledger, soon, late) == [30, 100]
    assert await ledger.release(acct, rid) == 0
    assert await ledger.release(acct, req(acct)) == 0  # unknown request
    info = await ledger.account(acct)
    assert info is not None and (info.reserved, info.consumed) == (0, 0)
    await conserved(ledger)


async def test_a_release_that_overtakes_its_reserve_leaves_the_request_finished(ledger: Ledger) -> None:
    # The proxy releases a request whose client left while its reserve was on the way; on another
    # connection the release may reach Redis first. The late reserve must then hold nothing.
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="grant")
    rid = req(acct)
    assert await ledger.release(acct, rid, reason="client_disconnect") == 0
    with pytest.raises(LedgerError, match="already finished"):
        await ledger.reserve(acct, rid, 70)
    info = await ledger.account(acct)
    assert info is not None and (info.reserved, info.consumed) == (0, 0)
    assert (await ledger.balance(acct)).available_micro == 100
    await conserved(ledger)


async def test_release_into_an_expired_bucket_forfeits_at_once(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    short = (
        await ledger.credit(acct, 100, reference="a", source="grant", expires_at_ms=now + 60_000)
    ).bucket_id
    rid = req(acct)
    await ledger.reserve(acct, rid, 40)
    clock.advance(61)
    assert await ledger.expire() == (1, 60)
    assert await ledger.release(acct, rid) == 40
    assert await remaining(ledger, short) == [0]
    info = await ledger.account(acct)
    assert info is not None and info.forfeited == 100
    await conserved(ledger)


# ----- refund -----------------------------------------------------------------------------------


async def test_refund_partial_then_the_rest(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="topup")).bucket_id
    await ledger.reserve(acct, req(acct), 10)
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30) == 30
    assert await remaining(ledger, bid) == [60]
    assert await ledger.refund(acct, bid, refund_id="rfd_2") == 60  # 0 = all that is left
    assert await remaining(ledger, bid) == [0]
    info = await ledger.account(acct)
    assert info is not None and (info.refunded, info.reserved) == (90, 10)
    with pytest.raises(NotRefundable):
        await ledger.refund(acct, bid, refund_id="rfd_3")
    await conserved(ledger)


async def test_refund_is_idempotent_on_refund_id(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="topup")).bucket_id
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30) == 30
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30) == 30
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=50) == 30
    assert await remaining(ledger, bid) == [70]
    assert len(await events(ledger, acct, "refunded")) == 1
    await conserved(ledger)


async def test_refund_more_than_remaining_is_refused(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="topup")).bucket_id
    await ledger.reserve(acct, req(acct), 60)
    with pytest.raises(NotRefundable) as err:
        await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=41)
    assert err.value.details == {"remaining_micro": 40}
    assert await remaining(ledger, bid) == [40]
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=40) == 40
    await conserved(ledger)


async def test_refund_of_an_expired_bucket_is_refused(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    bid = (
        await ledger.credit(acct, 100, reference="a", source="topup", expires_at_ms=ledger.now_ms() + 5000)
    ).bucket_id
    clock.advance(5)  # at the expiry instant, before any sweep
    with pytest.raises(NotRefundable):
        await ledger.refund(acct, bid, refund_id="rfd_1")
    assert await remaining(ledger, bid) == [100]
    info = await ledger.account(acct)
    assert info is not None and info.refunded == 0
    await conserved(ledger)


async def test_refund_of_a_foreign_or_unknown_bucket_is_refused(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    other = await new_account(ledger, "other@example.com")
    theirs = (await ledger.credit(other, 100, reference="a", source="topup")).bucket_id
    with pytest.raises(UnknownBucket):
        await ledger.refund(acct, theirs, refund_id="rfd_1")
    with pytest.raises(UnknownBucket):
        await ledger.refund(acct, K.new_bucket_id(K.shard_of(acct)), refund_id="rfd_2")
    assert await remaining(ledger, theirs) == [100]
    await conserved(ledger)


async def test_finish_refund_confirmed_keeps_the_credit_out(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="topup")).bucket_id
    await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30)
    assert await ledger.finish_refund(acct, "rfd_1", ok=True, external_ref="rfnd_omise_1")
    assert not await ledger.finish_refund(acct, "rfd_1", ok=False)  # already concluded
    assert not await ledger.finish_refund(acct, "rfd_unknown", ok=True)
    assert await remaining(ledger, bid) == [70]
    info = await ledger.account(acct)
    assert info is not None and info.refunded == 30
    assert [e["external_ref"] for e in await events(ledger, acct, "refund_confirmed")] == ["rfnd_omise_1"]
    await conserved(ledger)


async def test_finish_refund_reverted_puts_the_credit_back(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="topup")).bucket_id
    await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30)
    assert await ledger.finish_refund(acct, "rfd_1", ok=False)
    assert await remaining(ledger, bid) == [100]
    info = await ledger.account(acct)
    assert info is not None and info.refunded == 0
    with pytest.raises(NotRefundable):  # the same refund id is not tried twice
        await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30)
    await conserved(ledger)


async def test_finish_refund_reverted_after_expiry_forfeits(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    bid = (
        await ledger.credit(acct, 100, reference="a", source="topup", expires_at_ms=ledger.now_ms() + 60_000)
    ).bucket_id
    await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=30)
    clock.advance(60)
    assert await ledger.finish_refund(acct, "rfd_1", ok=False)
    assert await remaining(ledger, bid) == [70]  # unswept: counted as forfeited by the invariant
    info = await ledger.account(acct)
    assert info is not None and (info.refunded, info.forfeited) == (0, 30)
    await conserved(ledger)
    assert await ledger.expire() == (1, 70)
    info = await ledger.account(acct)
    assert info is not None and info.forfeited == 100
    await conserved(ledger)


# ----- expire -----------------------------------------------------------------------------------


async def test_expire_forfeits_and_is_idempotent(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger)
    now = ledger.now_ms()
    short = (
        await ledger.credit(acct, 100, reference="a", source="grant", expires_at_ms=now + 60_000)
    ).bucket_id
    long = (
        await ledger.credit(acct, 100, reference="b", source="grant", expires_at_ms=now + 600_000)
    ).bucket_id
    rid = req(acct)
    await ledger.reserve(acct, rid, 30)
    await ledger.settle(acct, rid, 30, metering={})
    assert await ledger.expire() == (0, 0)
    clock.advance(60)
    assert await ledger.expire() == (1, 70)
    assert await ledger.expire() == (0, 0)
    assert await remaining(ledger, short, long) == [0, 100]
    info = await ledger.account(acct)
    assert info is not None and (info.forfeited, info.consumed) == (70, 30)
    assert [e["amount"] for e in await events(ledger, acct, "forfeited")] == ["70"]
    await conserved(ledger)


async def test_expire_visits_every_shard_in_batches(ledger: Ledger, clock: Clock) -> None:
    accounts = [await new_account(ledger, f"u{i}@example.com") for i in range(6)]
    expires = ledger.now_ms() + 1000
    for acct in accounts:
        for i in range(3):
            await ledger.credit(acct, 10, reference=f"{acct}-{i}", source="grant", expires_at_ms=expires)
    clock.advance(1)
    assert await ledger.expire(limit=2) == (18, 180)
    await conserved(ledger)


# ----- API keys ---------------------------------------------------------------------------------


async def test_an_account_has_at_most_two_live_keys(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    k1 = await ledger.create_key(acct)
    k2 = await ledger.create_key(acct)
    with pytest.raises(KeyLimit):
        await ledger.create_key(acct)
    assert {k.key_id for k in await ledger.list_keys(acct)} == {k1.key_id, k2.key_id}
    await ledger.revoke_key(k1.key_id)
    k3 = await ledger.create_key(acct)
    assert {k.key_id for k in await ledger.list_keys(acct)} == {k2.key_id, k3.key_id}


async def test_lookup_key_finds_the_account(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    k = await ledger.create_key(acct)
    assert k.key.startswith(K.API_KEY_PREFIX) and k.prefix == k.key[:12]
    ref = await ledger.lookup_key(k.key)
    assert ref is not None and (ref.account_id, ref.key_id) == (acct, k.key_id)
    assert await ledger.key_account(k.key_id) == acct
    assert await ledger.lookup_key(k.key + "x") is None
    assert await ledger.lookup_key("not-a-key") is None
    assert await ledger.lookup_key(K.new_api_key(K.shard_of(acct))) is None


async def test_revoke_stops_a_key_at_once(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    k = await ledger.create_key(acct)
    assert await ledger.revoke_key(k.key_id) == acct
    assert await ledger.lookup_key(k.key) is None
    assert await ledger.key_account(k.key_id) is None
    assert await ledger.list_keys(acct) == []
    with pytest.raises(UnknownKey):
        await ledger.revoke_key(k.key_id)


async def test_rotate_fails_the_old_key_at_once_and_the_new_one_works(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    old = await ledger.create_key(acct)
    other = await ledger.create_key(acct)
    new = await ledger.rotate_key(old.key_id)  # at the limit of two: rotation replaces, it does not add
    assert await ledger.lookup_key(old.key) is None
    ref = await ledger.lookup_key(new.key)
    assert ref is not None and (ref.account_id, ref.key_id) == (acct, new.key_id)
    assert await ledger.lookup_key(other.key) is not None
    assert {k.key_id for k in await ledger.list_keys(acct)} == {other.key_id, new.key_id}
    with pytest.raises(UnknownKey):
        await ledger.rotate_key(old.key_id)


async def test_api_key_is_stored_only_as_its_hash(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    k = await ledger.create_key(acct)
    rotated = await ledger.rotate_key(k.key_id)
    dump = await scan_ledger(ledger)  # the journal stream included
    text = "\n".join(f"{key}={value}" for key, value in dump.items())
    for key in (k.key, rotated.key):
        assert key not in text
        assert key[12:] not in text  # not even the secret part alone
    assert K.hash_api_key(rotated.key) in text  # the scan does see the stored hash


# ----- concurrency limit and low balance --------------------------------------------------------


async def test_concurrency_limit_counts_open_reservations_of_the_key(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 1000, reference="a", source="grant")
    k1 = await ledger.create_key(acct)
    k2 = await ledger.create_key(acct)
    r1, r2, r3 = req(acct), req(acct), req(acct)
    await ledger.reserve(acct, r1, 10, key_id=k1.key_id, concurrency_limit=2)
    await ledger.reserve(acct, r2, 10, key_id=k1.key_id, concurrency_limit=2)
    with pytest.raises(ConcurrencyLimit):
        await ledger.reserve(acct, r3, 10, key_id=k1.key_id, concurrency_limit=2)
    assert (await ledger.balance(acct)).reserved_micro == 20  # the refused one held nothing
    await ledger.reserve(acct, req(acct), 10, key_id=k2.key_id, concurrency_limit=2)  # per key
    assert await ledger.reserve(acct, r2, 10, key_id=k1.key_id, concurrency_limit=2) == 10  # retry
    await ledger.settle(acct, r1, 5, metering={})
    assert await ledger.reserve(acct, r3, 10, key_id=k1.key_id, concurrency_limit=2) == 10
    with pytest.raises(ConcurrencyLimit):
        await ledger.reserve(acct, req(acct), 10, key_id=k1.key_id, concurrency_limit=2)
    await ledger.release(acct, r2)
    await ledger.reserve(acct, req(acct), 10, key_id=k1.key_id, concurrency_limit=2)
    last_used = {k.key_id: k.last_used_at for k in await ledger.list_keys(acct)}
    assert last_used == {k1.key_id: ledger.now_ms(), k2.key_id: None}
    await conserved(ledger)


async def test_low_balance_is_recorded_once_per_crossing(ledger: Ledger) -> None:
    acct = await new_account(ledger, low_threshold_micro=50)
    await ledger.credit(acct, 100, reference="a", source="topup")
    for charge in (30, 30, 10, 5):  # 70, 40 (crossed), 30, 25
        rid = req(acct)
        await ledger.reserve(acct, rid, charge)
        await ledger.settle(acct, rid, charge, metering={})
    assert len(await events(ledger, acct, "low_balance")) == 1
    assert (await ledger.balance(acct)).low_balance
    await ledger.credit(acct, 100, reference="b", source="topup")  # 125: armed again
    assert not (await ledger.balance(acct)).low_balance
    rid = req(acct)
    await ledger.reserve(acct, rid, 100)
    await ledger.settle(acct, rid, 100, metering={})  # 25: crossed again
    lows = await events(ledger, acct, "low_balance")
    assert [(e["available"], e["threshold"]) for e in lows] == [("40", "50"), ("25", "50")]
    await ledger.set_low_threshold(acct, 10)  # 25 >= 10: re-armed, no event
    await ledger.set_low_threshold(acct, 30)  # 25 < 30: a crossing
    assert len(await events(ledger, acct, "low_balance")) == 3
    await conserved(ledger)


# ----- account closure --------------------------------------------------------------------------


async def test_closing_an_account_revokes_keys_and_forgets_email_and_sub(ledger: Ledger) -> None:
    email, sub = "closing.person@example.com", "google-sub-1234567890"
    acct = await new_account(ledger, email, sub=sub)
    assert await ledger.find_account_by_sub(sub) == acct
    assert await ledger.create_account("again@example.com", sub=sub) == (acct, False)
    k1 = await ledger.create_key(acct)
    k2 = await ledger.create_key(acct)
    await ledger.credit(acct, 100, reference="a", source="topup")
    rid = req(acct)
    await ledger.reserve(acct, rid, 10)
    await ledger.settle(acct, rid, 10, metering={})
    assert await ledger.close_account(acct) == (90, 2)
    assert await ledger.lookup_key(k1.key) is None and await ledger.lookup_key(k2.key) is None
    assert await ledger.find_account_by_sub(sub) is None
    info = await ledger.account(acct)
    assert info is not None and (info.status, info.email, info.forfeited, info.consumed) == (
        "closed",
        None,
        90,
        10,
    )
    # Everything, the journal stream included: it carries the email and sub only sealed with the
    # account's key (ledger/personal.py), and closing deleted that key.
    dump = await scan_ledger(ledger)
    text = "\n".join(f"{key}={value}" for key, value in dump.items())
    assert acct in text  # the scan does see the account's records
    for secret in (email, sub, K.hash_subject(sub)):
        assert secret not in text
    with pytest.raises(AccountClosed):
        await ledger.close_account(acct)
    with pytest.raises(UnknownAccount):
        await ledger.close_account(K.new_account_id(0))
    await conserved(ledger)


async def test_credit_given_back_after_closure_is_forfeited(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    await ledger.credit(acct, 100, reference="a", source="topup")
    r1, r2 = req(acct), req(acct)
    await ledger.reserve(acct, r1, 30)
    await ledger.reserve(acct, r2, 30)
    assert await ledger.close_account(acct) == (40, 0)
    s = await ledger.settle(acct, r1, 10, metering={})  # the stream ran on while the account closed
    assert (s.charged_micro, s.shortfall_micro) == (10, 0)
    assert await ledger.release(acct, r2) == 30
    assert await available(ledger, acct) == 0
    info = await ledger.account(acct)
    assert info is not None and (info.forfeited, info.consumed, info.reserved) == (90, 10, 0)
    await conserved(ledger)


# ----- script cache and number formatting -------------------------------------------------------


async def test_every_operation_survives_a_script_flush(
    ledger: Ledger, redis_client: aioredis.Redis, clock: Clock
) -> None:
    shas = {name: ledger._scripts._scripts[name].sha for name in SCRIPT_NAMES}
    seen: set[str] = set()

    async def flushed() -> None:
        await redis_client.script_flush()
        assert not any(await redis_client.script_exists(*shas.values()))

    async def loaded_now() -> None:
        loaded = dict(zip(shas, await redis_client.script_exists(*shas.values()), strict=True))
        seen.update(name for name, there in loaded.items() if there)

    await flushed()
    acct = await new_account(ledger, sub="sub-flush")
    await loaded_now()
    await flushed()
    await ledger.set_low_threshold(acct, 10)
    await loaded_now()
    await flushed()
    key = await ledger.create_key(acct)
    await loaded_now()
    await flushed()
    await ledger.revoke_key(key.key_id)
    await loaded_now()
    await flushed()
    bid = (
        await ledger.credit(acct, 100, reference="a", source="topup", expires_at_ms=ledger.now_ms() + 10_000)
    ).bucket_id
    await loaded_now()
    await flushed()
    r1 = req(acct)
    assert await ledger.reserve(acct, r1, 20) == 20
    await loaded_now()
    await flushed()
    assert (await ledger.settle(acct, r1, 15, metering={})).charged_micro == 15
    await loaded_now()
    r2 = req(acct)
    await ledger.reserve(acct, r2, 20)
    await flushed()
    assert await ledger.release(acct, r2) == 20
    await loaded_now()
    await flushed()
    assert await ledger.refund(acct, bid, refund_id="rfd_1", amount_micro=5) == 5
    await loaded_now()
    await flushed()
    assert await ledger.finish_refund(acct, "rfd_1", ok=True)
    await loaded_now()
    clock.advance(10)
    await flushed()
    assert await ledger.expire() == (1, 80)
    await loaded_now()
    await flushed()
    assert await ledger.close_account(acct) == (0, 0)
    await loaded_now()
    exercised = {
        "account_create",
        "account_set",
        "key_create",
        "key_revoke",
        "credit",
        "reserve",
        "settle",
        "release",
        "refund",
        "refund_finish",
        "expire",
        "account_close",
    }
    assert exercised <= set(SCRIPT_NAMES) and exercised <= seen
    await conserved(ledger)


async def test_amounts_of_ten_to_the_fourteen_micro_survive_exactly(ledger: Ledger, clock: Clock) -> None:
    big = 10**14
    acct = await new_account(ledger, low_threshold_micro=big)
    bid = (await ledger.credit(acct, big, reference="a", source="grant")).bucket_id
    clock.advance(1)  # the second bucket expires a second later: drawn second
    await ledger.credit(acct, 2**50, reference="b", source="grant")
    rid = req(acct)
    assert await ledger.reserve(acct, rid, big) == big
    s = await ledger.settle(acct, rid, big + 10**13, metering={})
    assert (s.charged_micro, s.shortfall_micro) == (big + 10**13, 0)
    assert s.draws[0] == (bid, big) and s.draws[1][1] == 10**13
    assert await ledger.refund(acct, s.draws[1][0], refund_id="rfd_1", amount_micro=big) == big
    info = await ledger.account(acct)
    assert info is not None
    assert (info.credited, info.consumed, info.refunded) == (big + 2**50, big + 10**13, big)
    assert await available(ledger, acct) == 2**50 - 10**13 - big
    # The journal carries exact integers, never 1e+14.
    credited = await events(ledger, acct, "credited")
    assert credited[0]["amount"] == "100000000000000"
    settled = await events(ledger, acct, "settled")
    assert settled[0]["charged"] == str(big + 10**13)
    assert "e+" not in repr(await ledger.redis.hgetall(ledger.keys.pfx_for(acct) + "a:" + acct))
    await conserved(ledger)


async def test_a_reservation_holding_nothing_settles_and_releases(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    r1, r2 = req(acct), req(acct)
    assert await ledger.reserve(acct, r1, 10, min_micro=0) == 0
    assert await ledger.reserve(acct, r2, 10, min_micro=0) == 0
    assert await ledger.release(acct, r1) == 0
    s = await ledger.settle(acct, r2, 7, metering={})
    assert (s.charged_micro, s.shortfall_micro) == (0, 7)
    info = await ledger.account(acct)
    assert info is not None and (info.reserved, info.consumed) == (0, 0)
    assert [e["req"] for e in await events(ledger, acct, "released")] == [r1]
    await conserved(ledger)


async def test_the_conservation_checker_catches_a_broken_ledger(ledger: Ledger) -> None:
    acct = await new_account(ledger)
    bid = (await ledger.credit(acct, 100, reference="a", source="grant")).bucket_id
    await ledger.reserve(acct, req(acct), 30)
    await conserved(ledger)
    pfx = ledger.keys.pfx_for(acct)
    await ledger.redis.hincrby(pfx + "b:" + bid, "remaining", 1)  # credit from nowhere
    problems = await check_conservation(ledger)
    assert len(problems) == 1 and "credited 100 != available 71" in problems[0]
    await ledger.redis.hincrby(pfx + "b:" + bid, "remaining", -1)
    await ledger.redis.hincrby(pfx + "a:" + acct, "reserved", 5)  # reserved without a reservation
    problems = await check_conservation(ledger)
    assert any("open reservations hold 30 != reserved 35" in p for p in problems)
    await ledger.redis.hincrby(pfx + "a:" + acct, "reserved", -5)
    await ledger.redis.hset(pfx + "b:" + bid, "remaining", 200)
    assert any("outside [0, 100]" in p for p in await check_conservation(ledger))


async def test_expiry_alone_records_a_low_balance_crossing(ledger: Ledger, clock: Clock) -> None:
    acct = await new_account(ledger, low_threshold_micro=50)
    now = ledger.now_ms()
    await ledger.credit(acct, 100, reference="soon", source="topup", expires_at_ms=now + 1_000)
    await ledger.credit(acct, 30, reference="late", source="topup", expires_at_ms=now + 86_400_000)
    assert await events(ledger, acct, "low_balance") == []
    clock.advance(2)
    assert await ledger.expire() == (1, 100)  # 130 -> 30, below 50, with no request in between
    lows = await events(ledger, acct, "low_balance")
    assert [(e["available"], e["threshold"]) for e in lows] == [("30", "50")]
    assert (await ledger.balance(acct)).low_balance
    await conserved(ledger)
