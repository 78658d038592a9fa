"""Ledger throughput: reserve+settle pairs per second against the local Redis, beside the ceiling.

The ceiling is a trivial EVALSHA (`return 1`) at the same concurrency over the same client: a pair is
two script calls, so the pair-equivalent ceiling is half that rate. Prints both and the ratio (aim:
at least half of the ceiling).

    .venv/bin/python bench/ledger_bench.py [--n 20000] [--concurrency 64] [--redis-url URL]

Uses its own key prefix and deletes it afterwards; talks to loopback Redis only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from redis.asyncio import BlockingConnectionPool, Redis

from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import Ledger


async def _run_bounded(n: int, concurrency: int, job: object) -> float:
    """Run `job(i)` n times with at most `concurrency` in flight; returns elapsed seconds."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await job(i)  # type: ignore[operator]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="pairs (and trivial calls) to run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args(argv)

    pool = BlockingConnectionPool.from_url(
        args.redis_url, max_connections=args.concurrency, decode_responses=True
    )
    redis = Redis(connection_pool=pool)
    keys = Keyspace(prefix=f"bench{uuid.uuid4().hex[:8]}", shards=16)
    ledger = Ledger(redis, keys)
    try:
        await ledger.load_scripts()
        # One account per 64 concurrent requests: a real mix touches many accounts and shards.
        accounts = []
        for i in range(max(1, args.concurrency // 8)):
            acct, _ = await ledger.create_account(f"bench{i}@example.com")
            await ledger.credit(acct, 10**12, reference=f"bench-{i}", source="grant")
            accounts.append(acct)

        trivial = redis.register_script("return 1")
        await trivial()

        async def call_trivial(i: int) -> None:
            await trivial()

        async def pair(i: int) -> None:
            acct = accounts[i % len(accounts)]
            req = new_request_id(shard_of(acct))
            await ledger.reserve(acct, req, 500_000, min_micro=10_000, key_id="", concurrency_limit=0)
            await ledger.settle(acct, req, 123_456, metering={"request_id": req, "model": "bench"})

        # Warm both paths, then measure each twice in alternation and keep the better run.
        await _run_bounded(min(2000, args.n), args.concurrency, call_trivial)
        await _run_bounded(min(500, args.n), args.concurrency, pair)
        trivial_s = min([await _run_bounded(args.n, args.concurrency, call_trivial) for _ in range(2)])
        pair_s = min([await _run_bounded(args.n, args.concurrency, pair) for _ in range(2)])

        trivial_rate = args.n / trivial_s
        pair_rate = args.n / pair_s
        ceiling_pairs = trivial_rate / 2
        print(f"ledger bench: n={args.n} concurrency={args.concurrency} redis={args.redis_url}")
        print(f"{'measure':<40}{'per second':>14}")
        print(f"{'trivial EVALSHA (return 1)':<40}{trivial_rate:>14,.0f}")
        print(f"{'ceiling in pairs (trivial / 2)':<40}{ceiling_pairs:>14,.0f}")
        print(f"{'reserve+settle pairs':<40}{pair_rate:>14,.0f}")
        print(f"{'ratio to the ceiling (aim >= 0.50)':<40}{pair_rate / ceiling_pairs:>14.2f}")
        return 0
    finally:
        doomed = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*", count=5000)]
        for i in range(0, len(doomed), 1000):
            await redis.delete(*doomed[i : i + 1000])
        await redis.aclose()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
