"""What operators see: the worker's health record and metrics, and the start-up check of Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import fakeredis
import pytest
import redis.asyncio as aioredis

from gateway.worker import check, run_worker
from ledger.connection import redis_problems
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.store import Store
from tests.process_harness import RedisServer, free_port


@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_the_worker_reports_its_passes_reconcile_and_a_lost_ledger(
    ledger: Ledger, tmp_path: Path
) -> None:
    db = tmp_path / "gateway.sqlite3"
    store = Store(str(db))
    store.migrate()
    acct, _ = await ledger.create_account("ops@example.com")
    await ledger.credit(acct, 5_000_000, reference="health_1", source="grant")
    await ledger.reserve(acct, "req_00c1", 1_000_000)
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        run_worker(ledger, store, db, stop, interval_s=0.05, reconcile_every_s=0.2, metrics_port=port)
    )
    try:
        ok, record = False, {}
        for _ in range(200):
            ok, record = check(db)
            if ok and record.get("reconcile_ok") is True:
                break
            await asyncio.sleep(0.05)
        assert ok and record["reconcile_ok"] is True and record["ledger_whole"] is True
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            for line in ("ledger_whole 1", "ledger_reconcile_ok 1", "ledger_reconcile_problems 0"):
                assert line in text
            assert "ledger_oldest_open_hold_seconds" in text and "ledger_redis_used_memory_bytes" in text
            # The ledger's Redis loses its data: the worker stops applying and says so.
            lost = [k async for k in ledger.redis.scan_iter(match=ledger.keys.pattern())]
            await ledger.redis.delete(*lost)
            for _ in range(200):
                ok, record = check(db)
                if not record.get("ledger_whole"):
                    break
                await asyncio.sleep(0.05)
            assert not ok and record["ledger_whole"] is False
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 503
    finally:
        stop.set()
        await task
        store.close()
    # A stale record is unhealthy too (a worker that hangs or died).
    ok, record = check(db, now=time.time() + 60)
    assert not ok


def test_check_without_a_record_is_unhealthy(tmp_path: Path) -> None:
    ok, record = check(tmp_path / "gateway.sqlite3")
    assert not ok and "no worker health record" in record["error"]


async def test_redis_configuration_problems_are_named(tmp_path: Path) -> None:
    good = RedisServer(tmp_path / "good", aof=True)
    bad = RedisServer(tmp_path / "bad", aof=False, policy="allkeys-lru")
    for server in (good, bad):
        server.start()
    try:
        for server, expected in ((good, []), (bad, ["no persistence", "maxmemory-policy is allkeys-lru"])):
            client = aioredis.Redis.from_url(server.url, decode_responses=True)
            problems = await redis_problems(client)
            await client.aclose()
            assert len(problems) == len(expected)
            for line, words in zip(problems, expected, strict=True):
                assert words in line
    finally:
        good.kill()
        bad.kill()
    # Where CONFIG is not allowed (managed Redis, here fakeredis), it says it could not check.
    fake = fakeredis.FakeAsyncRedis(decode_responses=True)
    problems = await redis_problems(fake)
    assert len(problems) <= 1
    if problems:
        assert "cannot read the Redis configuration" in problems[0]
    _ = Keyspace  # the keyspace fixture type, for readers
