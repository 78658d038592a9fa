"""Concurrency: many requests at once against one account never overdraw it, and every micro-unit is
accounted for. Runs on real Redis (a connection pool, truly concurrent scripts) and on fakeredis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool

from ledger.errors import InsufficientFunds, NotRefundable
from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import Ledger
from tests.conftest import REDIS_URL, Clock
from tests.ledger_invariants import check_conservation

PAIRS = 600


@pytest.fixture
async def pooled(redis_kind: str, clean_keyspace: Keyspace, clock: Clock) -> AsyncIterator[Ledger]:
    # A pool like the gateway's: callers queue for a connection instead of failing past its size.
    if redis_kind == "redis":
        client = aioredis.Redis(
            connection_pool=BlockingConnectionPool.from_url(
                REDIS_URL, max_connections=64, timeout=30, decode_responses=True
            )
        )
    else:
        client = fakeredis.FakeAsyncRedis(decode_responses=True, max_connections=PAIRS + 100)
    yield Ledger(client, clean_keyspace, clock=clock)
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
    # The soonest-expiring bucket is drained before the later one is touched beyond it.
    first, second = sorted(bal.buckets, key=lambda b: b.expires_at)
    assert first.remaining_micro == 0 or second.remaining_micro == second.amount_micro
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
