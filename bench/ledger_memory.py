"""Redis memory per request, for sizing: what each reserve+settle leaves in Redis.

Runs N requests (reserve, settle with a real metering row) on a fresh prefix of a Redis of its own
(started here on a free port, so nothing else moves `used_memory`), and reads INFO used_memory:

- steady: the worker drains and trims the journal as it goes, so what stays is each request's
  outcome key (`rd:*`, kept LEDGER_DONE_TTL_S for retried and replayed settlements);
- worker down: the journal is not drained either (events accumulate until the worker is back).

    .venv/bin/python bench/ledger_memory.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from bench._common import free_port  # noqa: E402
from ledger.epoch import open_ledger  # noqa: E402
from ledger.journal import JournalWorker  # noqa: E402
from ledger.keys import Keyspace, new_request_id, shard_of  # noqa: E402
from ledger.ledger import Ledger  # noqa: E402
from ledger.store import Store  # noqa: E402


def metering(req: str, key_id: str) -> dict[str, object]:
    return {
        "request_id": req, "key_id": key_id, "model": "deepseek-chat", "provider": "deepseek",
        "upstream_model": "deepseek-chat", "input_cache_hit_tokens": 11_000, "input_cache_miss_tokens": 2_345,
        "cache_write_tokens": 0, "output_tokens": 812, "status": "ok", "estimated": False,
        "started_at": "2026-11-30T06:00:00.000Z", "finished_at": "2026-11-30T06:00:09.123Z", "latency_ms": 9123,
    }


async def used(r: Redis) -> int:
    info = await r.info("memory")
    return int(info["used_memory"])


async def run(r: Redis, n: int, *, drain: bool, store: Store) -> float:
    keyspace = Keyspace(prefix=f"mem{time.time_ns() % 10**9}", shards=16)
    ledger = Ledger(r, keyspace)

    async def nothing() -> bool:
        return False

    await open_ledger(ledger, nothing)
    accounts = []
    for i in range(64):
        acct, _ = await ledger.create_account(f"user{i}@example.com")
        await ledger.credit(acct, 10**12, reference=f"mem:{acct}", source="grant")
        accounts.append((acct, (await ledger.create_key(acct)).key_id))
    worker = JournalWorker(r, keyspace, store, ledger=ledger)
    await worker.drain_once()
    base = await used(r)
    for i in range(n):
        acct, key_id = accounts[i % len(accounts)]
        req = new_request_id(shard_of(acct))
        await ledger.reserve(acct, req, 50_000, key_id=key_id)
        await ledger.settle(acct, req, 12_345, metering=metering(req, key_id))
        if drain and i % 500 == 499:
            await worker.drain_once()
    if drain:
        await worker.drain_once()
    return (await used(r) - base) / n


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    args = ap.parse_args(argv)
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ledger-memory-"))
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )
    r = Redis(port=port, decode_responses=True)
    try:
        for _ in range(100):
            try:
                await r.ping()
                break
            except Exception:
                await asyncio.sleep(0.05)
        store = Store(str(tmp / "bench.sqlite3"))
        store.migrate()
        steady = await run(r, args.requests, drain=True, store=store)
        backlog = await run(r, args.requests, drain=False, store=store)
        mib = 1024 * 1024
        print(f"requests per run: {args.requests}")
        print(f"steady (journal drained): {steady:.0f} B/request = {steady * 1e6 / mib:.0f} MiB per million requests")
        print(f"worker down (journal kept): {backlog:.0f} B/request = {backlog * 1e6 / mib:.0f} MiB per million requests")
        store.close()
    finally:
        await r.aclose()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
