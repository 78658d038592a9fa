"""Concurrency: many requests at once against one account never overdraw it, and every micro-unit is
accounted for. Runs on real Redis (a connection pool, truly concurrent scripts) and on fakeredis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool

from ledger.epoch import open_ledger
from ledger.errors import ConcurrencyLimit, InsufficientFunds, NotRefundable
from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import Ledger
from ledger.redis_client import connect
from tests.conftest import REDIS_URL, Clock, no_history
from tests.ledger_invariants import check_conservation

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

PAIRS = 600
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
async def pooled(
    redis_kind: str, clean_keyspace: Keyspace, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[Ledger]:
    # A pool like the gateway's: callers queue for a connection instead of failing past its size.
    client: Any
    if redis_kind == "cluster":
        # The gateway's own cluster client, bounded at 64 in flight: hundreds of pairs wait, none fail.
        client = await connect(request.getfixturevalue("redis_cluster").url)
    elif redis_kind == "redis":
        client = aioredis.Redis(
            connection_pool=BlockingConnectionPool.from_url(
                REDIS_URL, max_connections=64, timeout=30, decode_responses=True
            )
        )
    else:
        client = fakeredis.FakeAsyncRedis(decode_responses=True, max_connections=PAIRS + 100)
    led = Ledger(client, clean_keyspace, clock=clock)
    await open_ledger(led, no_history)
    yield led
    await client.aclose()


async def test_hundreds_of_concurrent_reserve_settle_pairs_never_overdraw(pooled: Ledger) -> None:
    ledger = pooled
    acct, _ = await ledger.create_account("busy@example.com")
    # Two buckets: 40% of what the pairs would need at full price.
    await ledger.credit(
        acct, 9_000_000, reference="a", source="topup", expires_at_ms=ledger.now_ms() + 86_400_000
    )
    await ledger.credit(
        acct, 15_000_000, reference="b", source="topup", expires_at_ms=ledger.now_ms() + 2 * 86_400_000
    )
    credited = 24_000_000
    rng = random.Random(7)
    plans = [(rng.randrange(50_000, 150_000), rng.randrange(0, 160_000)) for _ in range(PAIRS)]
    low_water: list[int] = []

    async def pair(i: int, hold: int, charge: int) -> tuple[int, int] | None:
        req = new_request_id(shard_of(acct))
        try:
            held = await ledger.reserve(acct, req, hold, min_micro=hold)
        except InsufficientFunds:
            return None
        await asyncio.sleep(0)  # let others interleave between the two calls
        s = await ledger.settle(acct, req, charge, metering={"request_id": req, "n": i})
        assert s.charged_micro + s.shortfall_micro == charge
        return held, s.charged_micro

    async def watch() -> None:
        for _ in range(40):
            bal = await ledger.balance(acct)
            low_water.append(
                min(bal.available_micro, bal.reserved_micro, *(b.remaining_micro for b in bal.buckets))
            )
            await asyncio.sleep(0.005)

    results, _ = await asyncio.gather(
        asyncio.gather(*(pair(i, h, c) for i, (h, c) in enumerate(plans))), watch()
    )
    done = [r for r in results if r is not None]
    refused = len(results) - len(done)
    assert done and refused, "the balance must cover some pairs and not all"
    assert min(low_water) >= 0
    info = await ledger.account(acct)
    assert info is not None
    charged = sum(c for _, c in done)
    assert info.consumed == charged  # the sum of charges is exactly the credit consumed
    assert info.reserved == 0
    bal = await ledger.balance(acct)
    assert bal.available_micro == credited - charged >= 0
    assert all(b.remaining_micro >= 0 for b in bal.buckets)
    # (Which bucket ends with what is not fixed here: a settle returns its surplus to the buckets its
    # own hold came from, so under concurrency both can end partly used. The soonest-first rule is
    # tested sequentially in test_ledger.py and end to end in test_proxy.py.)
    assert await check_conservation(ledger) == []


async def test_concurrent_credits_with_one_reference_credit_once(pooled: Ledger) -> None:
    ledger = pooled
    acct, _ = await ledger.create_account("dup@example.com")
    results = await asyncio.gather(
        *(ledger.credit(acct, 5_000_000, reference="omise:chrg_1", source="topup") for _ in range(50))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.bucket_id for r in results}) == 1
    info = await ledger.account(acct)
    assert info is not None and info.credited == 5_000_000
    assert await check_conservation(ledger) == []


async def test_a_refund_racing_spending_never_exceeds_the_bucket(pooled: Ledger) -> None:
    ledger = pooled
    acct, _ = await ledger.create_account("race@example.com")
    bucket = (await ledger.credit(acct, 10_000_000, reference="t", source="topup")).bucket_id

    async def spend(i: int) -> int:
        req = new_request_id(shard_of(acct))
        try:
            await ledger.reserve(acct, req, 400_000)
        except InsufficientFunds:
            return 0
        return (await ledger.settle(acct, req, 400_000, metering={"n": i})).charged_micro

    async def refund() -> int:
        await asyncio.sleep(0.001)
        try:
            return await ledger.refund(acct, bucket, refund_id="rfd_race")
        except NotRefundable:
            return 0

    *spent, refunded = await asyncio.gather(*(spend(i) for i in range(40)), refund())
    assert sum(spent) + refunded <= 10_000_000
    b = await ledger.bucket(bucket)
    assert b is not None and b.remaining_micro == 10_000_000 - sum(spent) - refunded >= 0
    assert await check_conservation(ledger) == []


# ----- exact counts, key limits, sweeps racing settles, many accounts ------------------------------


async def funded_account(ledger: Ledger, *amounts: int) -> tuple[str, list[str]]:
    acct, _ = await ledger.create_account("busy@example.com")
    now = ledger.now_ms()
    bids = []
    for i, amount in enumerate(amounts):
        c = await ledger.credit(
            acct, amount, reference=f"chrg_{i}", source="topup", expires_at_ms=now + (i + 1) * DAY_MS
        )
        bids.append(c.bucket_id)
    return acct, bids


class Watch:
    """Reads every bucket and the account's counters while the storm runs: nothing may dip below 0."""

    def __init__(self, ledger: Ledger, acct: str, bids: list[str]) -> None:
        self.ledger, self.acct, self.bids = ledger, acct, bids
        self.reads = 0
        self.low: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        r, pfx = self.ledger.redis, self.ledger.keys.pfx_for(self.acct)
        while not self._stop.is_set():
            for bid in self.bids:
                rem = int(await r.hget(pfx + "b:" + bid, "remaining"))
                if rem < 0:
                    self.low.append(f"{bid} remaining {rem}")
            for name in ("reserved", "consumed"):
                v = int(await r.hget(pfx + "a:" + self.acct, name))
                if v < 0:
                    self.low.append(f"{name} {v}")
            self.reads += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._stop.set()


async def test_concurrent_pairs_succeed_exactly_as_often_as_the_balance_covers(pooled: Ledger) -> None:
    ledger = pooled
    # 250 charges of 1000 fit; 600 arrive at once.
    acct, bids = await funded_account(ledger, 100_000, 100_000, 50_000)
    watch = Watch(ledger, acct, bids)
    watcher = asyncio.create_task(watch.run())

    async def pair() -> int:
        rid = new_request_id(shard_of(acct))
        try:
            await ledger.reserve(acct, rid, 1000)
        except InsufficientFunds:
            return 0
        await asyncio.sleep(0)
        s = await ledger.settle(acct, rid, 1000, metering={"n": 1})
        assert s.shortfall_micro == 0
        return s.charged_micro

    charges = await asyncio.gather(*(pair() for _ in range(PAIRS)))
    watch.stop()
    await watcher
    assert watch.low == [] and watch.reads > 0
    assert sum(1 for c in charges if c) == 250
    assert sum(charges) == 250_000
    info = await ledger.account(acct)
    assert info is not None and (info.consumed, info.reserved) == (250_000, 0)
    assert (await ledger.balance(acct)).available_micro == 0
    assert await check_conservation(ledger) == []


async def test_concurrent_partial_holds_with_surplus_and_overrun_stay_conserved(pooled: Ledger) -> None:
    ledger = pooled
    # Partial holds, charges below and above the hold: some pairs return credit others then use.
    acct, bids = await funded_account(ledger, 150_000, 100_000, 50_000)
    credited = 300_000
    rng = random.Random(7)
    plans = [(rng.randint(1, 2000), rng.randint(0, 2500)) for _ in range(PAIRS)]
    watch = Watch(ledger, acct, bids)
    watcher = asyncio.create_task(watch.run())

    async def pair(hold: int, charge: int) -> tuple[int, int, int]:
        rid = new_request_id(shard_of(acct))
        try:
            held = await ledger.reserve(acct, rid, hold, min_micro=1)
        except InsufficientFunds:
            return 0, 0, 0
        await asyncio.sleep(0)
        s = await ledger.settle(acct, rid, charge, metering={})
        assert s.charged_micro + s.shortfall_micro == charge
        assert sum(a for _, a in s.draws) == s.charged_micro
        if s.shortfall_micro:
            assert s.charged_micro >= held  # a shortfall only after the hold itself was spent
        return 1, s.charged_micro, s.shortfall_micro

    results = await asyncio.gather(*(pair(h, c) for h, c in plans))
    watch.stop()
    await watcher
    assert watch.low == []
    charged = sum(c for _, c, _ in results)
    info = await ledger.account(acct)
    bal = await ledger.balance(acct)
    assert info is not None and info.reserved == 0
    assert info.consumed == charged <= credited
    assert bal.available_micro == credited - charged >= 0
    assert sum(n for n, _, _ in results) > 0
    assert await check_conservation(ledger) == []


async def test_concurrent_reserves_respect_the_key_limit(pooled: Ledger) -> None:
    ledger = pooled
    acct, _ = await funded_account(ledger, 1_000_000)
    key = await ledger.create_key(acct)

    async def reserve() -> bool:
        try:
            await ledger.reserve(
                acct, new_request_id(shard_of(acct)), 10, key_id=key.key_id, concurrency_limit=16
            )
        except ConcurrencyLimit:
            return False
        return True

    got = await asyncio.gather(*(reserve() for _ in range(300)))
    assert sum(got) == 16
    assert (await ledger.balance(acct)).reserved_micro == 160
    assert await check_conservation(ledger) == []


async def test_concurrent_credits_of_many_references_credit_each_once(pooled: Ledger) -> None:
    ledger = pooled
    acct, _ = await ledger.create_account("payer@example.com")
    await asyncio.gather(
        *(ledger.credit(acct, 1_000_000, reference=f"chrg_{i % 50}", source="topup") for i in range(300))
    )
    info = await ledger.account(acct)
    assert info is not None and info.credited == 50_000_000
    assert len(await ledger.buckets(acct)) == 50
    assert await check_conservation(ledger) == []


async def test_concurrent_refunds_and_spending_never_exceed_the_bucket(pooled: Ledger) -> None:
    ledger = pooled
    acct, (bid,) = await funded_account(ledger, 100_000)

    async def spend() -> int:
        rid = new_request_id(shard_of(acct))
        try:
            await ledger.reserve(acct, rid, 1000)
        except InsufficientFunds:
            return 0
        return (await ledger.settle(acct, rid, 1000, metering={})).charged_micro

    async def refund(i: int) -> int:
        try:
            # Each refund is retried (the same refund id) while others run: taken once.
            got = await asyncio.gather(
                *(ledger.refund(acct, bid, refund_id=f"rfd_{i}", amount_micro=5000) for _ in range(3))
            )
        except NotRefundable:
            return 0
        assert len(set(got)) == 1
        return got[0]

    jobs = [spend() for _ in range(300)] + [refund(i) for i in range(40)]
    random.Random(3).shuffle(jobs)
    outs = await asyncio.gather(*jobs)
    total = sum(outs)
    b = await ledger.bucket(bid)
    info = await ledger.account(acct)
    assert b is not None and info is not None
    assert b.remaining_micro >= 0
    assert info.consumed + info.refunded + b.remaining_micro == 100_000
    assert total == info.consumed + info.refunded
    assert info.refunded % 5000 == 0 and info.consumed % 1000 == 0
    assert await check_conservation(ledger) == []


async def test_stale_sweep_racing_settles_charges_each_request_once(pooled: Ledger, clock: Clock) -> None:
    ledger = pooled
    acct, _ = await funded_account(ledger, 200_000)
    rids = [new_request_id(shard_of(acct)) for _ in range(150)]
    await asyncio.gather(*(ledger.reserve(acct, rid, 1000, ttl_s=60) for rid in rids))
    clock.advance(61)  # every reservation is now abandoned, and every stream finishes at once
    settles = [ledger.settle(acct, rid, 700, metering={}) for rid in rids]
    sweeps = asyncio.gather(ledger.release_stale(), ledger.release_stale())
    (first, second), settled = await asyncio.gather(sweeps, asyncio.gather(*settles))
    assert 0 <= first + second <= 150  # a request released by the sweep is then settled late
    assert all(s.charged_micro == 700 and not s.already for s in settled)
    info = await ledger.account(acct)
    assert info is not None and (info.consumed, info.reserved) == (150 * 700, 0)
    assert (await ledger.balance(acct)).available_micro == 200_000 - 150 * 700
    again = await asyncio.gather(*(ledger.settle(acct, rid, 700, metering={}) for rid in rids))
    assert all(s.already for s in again)
    assert await check_conservation(ledger) == []


async def test_concurrent_spending_across_accounts_and_shards(pooled: Ledger) -> None:
    ledger = pooled
    accounts = 8
    accts = []
    for i in range(accounts):
        acct, _ = await ledger.create_account(f"u{i}@example.com")
        await ledger.credit(acct, 20_000, reference=f"chrg_{i}", source="topup")
        accts.append(acct)

    async def pair(acct: str) -> int:
        rid = new_request_id(shard_of(acct))
        try:
            await ledger.reserve(acct, rid, 1000)
        except InsufficientFunds:
            return 0
        return (await ledger.settle(acct, rid, 1000, metering={})).charged_micro

    charges = await asyncio.gather(*(pair(accts[i % accounts]) for i in range(PAIRS)))
    assert sum(charges) == accounts * 20_000
    for acct in accts:
        assert (await ledger.balance(acct)).available_micro == 0
    assert await check_conservation(ledger) == []
