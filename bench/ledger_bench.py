"""Ledger throughput: reserve+settle pairs per second against the local Redis, beside the ceiling.

The ceiling is a trivial EVALSHA (`return 1`) at the same concurrency over the same client: a pair is
two script calls, so the pair-equivalent ceiling is half that rate. Prints both and the ratio (aim:
at least half of the ceiling), and where the time goes: this process's CPU per operation, Redis's CPU
per operation, the Lua time per operation (INFO commandstats, evalsha usec) and the Redis commands
the scripts run per operation. Those Redis figures are instance-wide: run it on a quiet Redis.

    .venv/bin/python bench/ledger_bench.py [--n 20000] [--concurrency 64] [--redis-url URL]

Uses its own key prefix and deletes it afterwards; talks to loopback Redis only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis

from ledger.epoch import new_epoch, write_epoch
from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import Ledger


@dataclass(frozen=True)
class Phase:
    """One measured run: wall time, this process's CPU, and Redis's own counters over the run."""

    n: int
    wall_s: float
    client_cpu_s: float
    redis_cpu_s: float
    script_usec: float  # evalsha/evalsha_ro execution time, nested commands included
    nested_calls: int  # redis.call()s made from the scripts

    @property
    def rate(self) -> float:
        return self.n / self.wall_s

    def per_op_us(self, seconds: float) -> float:
        return seconds * 1e6 / self.n


async def _redis_counters(redis: Redis) -> tuple[float, float, int]:
    cpu = await redis.info("cpu")
    stats = await redis.info("commandstats")
    script_usec = 0.0
    nested = 0
    for name, st in stats.items():
        cmd = name.removeprefix("cmdstat_")
        if cmd.startswith(("eval", "script", "info")):
            if cmd.startswith("evalsha"):
                script_usec += float(st["usec"])
            continue
        nested += int(st["calls"])
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), script_usec, nested


async def _run_bounded(
    redis: Redis, n: int, concurrency: int, job: Callable[[int], Awaitable[None]]
) -> Phase:
    """Run `job(i)` n times with at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await job(i)

    cpu0, usec0, calls0 = await _redis_counters(redis)
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, client = time.perf_counter() - t0, time.process_time() - c0
    cpu1, usec1, calls1 = await _redis_counters(redis)
    return Phase(n, wall, client, cpu1 - cpu0, usec1 - usec0, calls1 - calls0)


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
        await write_epoch(ledger, new_epoch(ledger.now_ms()))  # a new ledger: its markers
        # One account per 64 concurrent requests: a real mix touches many accounts and shards.
        accounts = []
        for i in range(max(1, args.concurrency // 8)):
            acct, _ = await ledger.create_account(f"bench{i}@example.com")
            await ledger.credit(acct, 10**12, reference=f"bench-{i}", source="grant")
            accounts.append(acct)

        return_1 = redis.register_script("return 1")
        await return_1()

        async def call_trivial(i: int) -> None:
            await return_1()

        async def pair(i: int) -> None:
            acct = accounts[i % len(accounts)]
            req = new_request_id(shard_of(acct))
            await ledger.reserve(acct, req, 500_000, min_micro=10_000, key_id="", concurrency_limit=0)
            await ledger.settle(acct, req, 123_456, metering={"request_id": req, "model": "bench"})

        # Warm both paths, then measure each twice in alternation and keep the better run.
        await _run_bounded(redis, min(2000, args.n), args.concurrency, call_trivial)
        await _run_bounded(redis, min(500, args.n), args.concurrency, pair)
        runs: dict[str, list[Phase]] = {"trivial": [], "pair": []}
        for _ in range(2):
            runs["trivial"].append(await _run_bounded(redis, args.n, args.concurrency, call_trivial))
            runs["pair"].append(await _run_bounded(redis, args.n, args.concurrency, pair))
        trivial = max(runs["trivial"], key=lambda p: p.rate)
        pairs = max(runs["pair"], key=lambda p: p.rate)

        ceiling_pairs = trivial.rate / 2
        print(f"ledger bench: n={args.n} concurrency={args.concurrency} redis={args.redis_url}")
        head = ("measure", "per second", "client CPU us", "Redis CPU us", "Lua us", "cmds")
        print(f"{head[0]:<36}{head[1]:>12}{head[2]:>15}{head[3]:>14}{head[4]:>9}{head[5]:>7}")
        for label, ph in (("trivial EVALSHA (return 1)", trivial), ("reserve+settle pairs", pairs)):
            print(
                f"{label:<36}{ph.rate:>12,.0f}{ph.per_op_us(ph.client_cpu_s):>15.1f}"
                f"{ph.per_op_us(ph.redis_cpu_s):>14.1f}{ph.script_usec / ph.n:>9.1f}"
                f"{ph.nested_calls / ph.n:>7.1f}"
            )
        print(f"{'ceiling in pairs (trivial / 2)':<36}{ceiling_pairs:>12,.0f}")
        print(f"{'ratio to the ceiling (aim >= 0.50)':<36}{pairs.rate / ceiling_pairs:>12.2f}")
        print("(us per operation: a pair is two script calls; cmds = redis.call()s inside the scripts)")
        return 0
    finally:
        doomed = [k async for k in redis.scan_iter(match=f"{keys.prefix}:*", count=5000)]
        for i in range(0, len(doomed), 1000):
            await redis.delete(*doomed[i : i + 1000])
        await redis.aclose()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
