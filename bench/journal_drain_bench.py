"""Journal drain rate: how many ledger events one worker copies into the history per second, on
SQLite and on PostgreSQL, from the same journal.

Fills the journal with N metered requests (reserve + settle, two events each, spread over A
accounts on every shard) with no worker running, then times one JournalWorker draining all of it
(batches of 500, each in one transaction with its cursor, then XTRIM), once per engine. The same
events are written for each engine (the journal is filled again between runs), so the figures
compare the engines, not the workloads.

    .venv/bin/python bench/journal_drain_bench.py [--requests 20000] [--accounts 200]
        [--redis-url redis://127.0.0.1:6379/0] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]

Uses its own key prefix (deleted afterwards), a SQLite file in a temporary directory and a
PostgreSQL database of its own (created and dropped). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from ledger.journal import JournalWorker  # noqa: E402
from ledger.keys import Keyspace, new_request_id, shard_of  # noqa: E402
from ledger.ledger import Ledger  # noqa: E402
from ledger.money import iso_ms  # noqa: E402
from ledger.store import Store  # noqa: E402

THB = 1_000_000


async def fill(ledger: Ledger, accounts: list[str], requests: int, concurrency: int = 32) -> int:
    """N reserve+settle pairs (metering JSON shaped like the proxy's); returns events journaled."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        acct = accounts[i % len(accounts)]
        async with sem:
            started = ledger.now_ms()
            req = new_request_id(shard_of(acct), started)
            await ledger.reserve(acct, req, 2_000, key_id="")
            metering = {
                "request_id": req,
                "model": "deepseek-chat",
                "provider": "deepseek",
                "upstream_model": "deepseek-chat",
                "input_cache_hit_tokens": 90_000,
                "input_cache_miss_tokens": 8_000,
                "cache_write_tokens": 0,
                "output_tokens": 128,
                "status": "ok",
                "estimated": False,
                "started_at": iso_ms(started),
                "finished_at": iso_ms(ledger.now_ms()),
                "latency_ms": 1200,
            }
            await ledger.settle(acct, req, 1_500, metering=metering)

    await asyncio.gather(*(one(i) for i in range(requests)))
    total = 0
    for shard in ledger.keys.all_shards():
        total += await ledger.redis.xlen(ledger.keys.journal(shard))
    return total


async def drain_into(ledger: Ledger, store: Store) -> tuple[int, float]:
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    t0 = time.perf_counter()
    applied = 0
    while n := await worker.drain_once():
        applied += n
    return applied, time.perf_counter() - t0


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--accounts", type=int, default=200)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--pg-url", default=os.environ.get("HISTORY_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    a = p.parse_args()

    redis = Redis.from_url(a.redis_url, decode_responses=True)
    prefixes: list[str] = []
    pg_db = f"cp_bench_{uuid.uuid4().hex[:8]}"
    base = a.pg_url.rpartition("/")[0]
    with psycopg.connect(a.pg_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{pg_db}"'.encode())
    tmp = tempfile.TemporaryDirectory()
    try:
        targets = {"sqlite": str(Path(tmp.name) / "bench.sqlite3"), "postgres": f"{base}/{pg_db}"}
        print(f"{a.requests} requests over {a.accounts} accounts, 16 shards, batch 500")
        for engine, target in targets.items():
            # A ledger of its own per engine: each history sees every event from the first.
            keyspace = Keyspace(prefix=f"bench{uuid.uuid4().hex[:8]}", shards=16)
            prefixes.append(keyspace.prefix)
            ledger = Ledger(redis, keyspace)
            await ledger.load_scripts()
            accounts = []
            for i in range(a.accounts):
                acct, _ = await ledger.create_account(f"bench-{i}@example.com")
                await ledger.credit(acct, 10_000 * THB, reference=f"bench_{i}", source="grant")
                accounts.append(acct)
            store = Store(target)
            store.migrate()
            await drain_into(ledger, store)  # the accounts' own events, not timed
            t0 = time.perf_counter()
            events = await fill(ledger, accounts, a.requests)
            fill_s = time.perf_counter() - t0
            applied, wall = await drain_into(ledger, store)
            assert applied == events, (applied, events)
            rows = store.query("SELECT count(*) FROM metering")[0][0]
            print(
                f"{engine:8s}: {applied} events in {wall:.2f} s = {applied / wall:,.0f} events/s "
                f"= {applied / 2 / wall:,.0f} metered requests/s  (journal filled at "
                f"{a.requests / fill_s:,.0f} req/s; {rows} metering rows)"
            )
            store.close()
    finally:
        for prefix in prefixes:
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await redis.delete(*keys[i : i + 500])
        await redis.aclose()
        with psycopg.connect(a.pg_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'.encode())
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
