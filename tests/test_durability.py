"""Money through Redis loss, outages, restarts, kills and shutdowns, against a real redis-server and
real `python -m gateway serve` / `worker` processes with real signals (issue 12).

After each: reconcile green in both stores, every answered request metered exactly once with its
charge, no hold left."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes.upstream import FakeUpstream, FakeUsage, Script
from tests.process_harness import Deployment, deployment
from tests.test_proxy_faults import row_charge

pytestmark = pytest.mark.slow

FUNDS = 10_000_000
BODY = {"model": "gpt-test", "stream": True, "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


class Streams:
    """Streams started together; `streaming` is set once every one has its first bytes."""

    def __init__(self, d: Deployment, key: str, n: int) -> None:
        self.d, self.key, self.n = d, key, n
        self.streaming = asyncio.Event()
        self._started = 0
        self.tasks = [asyncio.get_running_loop().create_task(self._one()) for _ in range(n)]

    async def _one(self) -> tuple[int, str, bytes, bool]:
        async with self.d.http.post(
            self.d.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {self.key}"}
        ) as r:
            rid = r.headers.get("x-request-id", "")
            if r.status != 200:
                return r.status, rid, await r.read(), False
            got = await r.content.readany()
            self._started += 1
            if self._started == self.n:
                self.streaming.set()
            try:
                got += await r.read()
            except aiohttp.ClientPayloadError:
                return r.status, rid, got, False
            return r.status, rid, got, got.endswith(b"data: [DONE]\n\n")

    async def results(self) -> list[tuple[int, str, bytes, bool]]:
        return await asyncio.gather(*self.tasks)


async def ask(d: Deployment, key: str) -> tuple[int, dict[str, Any]]:
    """A non-streamed request: (status, body with the response's x-request-id as `_id`)."""
    body = {**BODY, "stream": False}
    async with d.http.post(d.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, {**orjson.loads(await r.read()), "_id": r.headers.get("x-request-id", "")}


async def open_in_sqlite(d: Deployment, n: int) -> None:
    """Wait until the worker has copied n open reservations into SQLite (what a rebuild restores)."""
    for _ in range(200):
        store = d.store()
        try:
            if store.query("SELECT count(*) FROM reservations WHERE status = 'open'")[0][0] >= n:
                return
        finally:
            store.close()
        await asyncio.sleep(0.05)
    raise AssertionError("the worker never drained the reservations")


async def test_redis_restarted_empty_with_streams_in_flight(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.script = Script(text="word " * 60, text_chunks=30, chunk_delay_s=0.1)
    async with deployment(tmp_path, fake, aof=False) as d:
        d.start_web()
        d.start_worker()
        await d.ready()
        account, key = await d.funded_key(10)
        streams = Streams(d, key, 3)
        await streams.streaming.wait()
        await open_in_sqlite(d, 3)
        d.redis.kill()
        d.redis.wipe()
        d.redis.start()  # empty: the ledger is gone, the streams go on
        results = await streams.results()
        assert [(s, whole) for s, _, _, whole in results] == [(200, True)] * 3
        answered = [rid for _, rid, _, _ in results]
        # Lost, and known to be: 503 "being restored" (never 401), /readyz fails, the worker says so.
        status, err = await ask(d, key)
        assert status == 503 and "being restored" in err["error"]["message"]
        async with d.http.get(d.url + "/readyz") as r:
            assert r.status == 503
        for _ in range(100):
            if d.run("-m", "gateway", "worker", "--check").returncode == 1:
                break
            await asyncio.sleep(0.1)
        check = d.run("-m", "gateway", "worker", "--check")
        assert check.returncode == 1 and '"ledger_whole":false' in check.stdout
        assert len(fake.requests) == 3  # nothing served meanwhile
        # The one documented command, no --force: the holds come back, the spooled settlements land.
        rebuilt = d.run("-m", "ledger", "rebuild", "--json")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert await d.metered(3) == 3
        rows = await d.books(account, FUNDS, answered)
        assert all(r["status"] == "ok" and r["charge_micro"] == row_charge("gpt-test", r) > 0 for r in rows)
        status, _ = await ask(d, key)
        assert status == 200
        reconciled = d.run("-m", "ledger", "reconcile", "--json")
        assert reconciled.returncode == 0, reconciled.stdout


async def test_redis_down_longer_than_every_retry_budget_then_back_from_its_aof(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script = Script(text_chunks=20, chunk_delay_s=0.1, usage=FakeUsage(input_cache_miss=30, output=120))
    async with deployment(tmp_path, fake, aof=True) as d:
        d.start_web()
        d.start_worker()
        await d.ready()
        account, key = await d.funded_key(10)
        streams = Streams(d, key, 4)
        await streams.streaming.wait()
        d.redis.kill()  # down for longer than every settle retry: the answers finish meanwhile
        results = await streams.results()
        assert all(s == 200 and whole for s, _, _, whole in results)
        answered = [rid for _, rid, _, _ in results]
        status, err = await ask(d, key)
        assert status == 503 and "nothing was charged" in err["error"]["message"]
        await asyncio.sleep(3.0)  # well past the settle retries (about 1.5 s): all four are spooled
        d.redis.start()  # the same data, from its AOF
        # A healthy restart: no request fails on a stale pooled connection.
        for _ in range(20):
            status, answer = await ask(d, key)
            assert status == 200
            answered.append(answer["_id"])
        assert await d.metered(24) == 24
        rows = await d.books(account, FUNDS, answered)
        assert {r["status"] for r in rows} == {"ok"}
        assert all(r["charge_micro"] == row_charge("gpt-test", r) > 0 for r in rows)
        assert "gateway_settlements_spooled_total 4" in await _metrics(d)


async def _metrics(d: Deployment) -> str:
    async with d.http.get(d.url + "/metrics") as r:
        return await r.text()


async def test_kill_9_of_web_and_worker_bills_what_was_streamed_and_returns_the_holds(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script = Script(text="word " * 200, text_chunks=100, chunk_delay_s=0.05, usage=None)
    async with deployment(tmp_path, fake, aof=True) as d:
        web = d.start_web()
        worker = d.start_worker()
        await d.ready()
        account, key = await d.funded_key(10)
        streams = Streams(d, key, 2)
        await streams.streaming.wait()
        await asyncio.sleep(1.5)  # a few progress notes on disk
        worker.signal(signal.SIGKILL)
        web.signal(signal.SIGKILL)
        results = await streams.results()
        assert all(s == 200 and not whole for s, _, _, whole in results)
        d.start_worker()  # finds the dead web process's spool and settles its streams from the note
        assert await d.metered(2) == 2
        rows = await d.books(account, FUNDS, [rid for _, rid, _, _ in results])
        for row in rows:
            assert row["status"] == "interrupted"
            assert row["output_tokens"] > 0 and row["charge_micro"] == row_charge("gpt-test", row) > 0
        assert list((d.db.parent / "spool").glob("*.jsonl")) == []


async def test_sigterm_with_a_short_grace_exits_within_it_and_meters_every_cut_stream(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script = Script(text="word " * 200, text_chunks=100, chunk_delay_s=0.1, usage=None)
    grace = 2.0
    async with deployment(tmp_path, fake, aof=False, SHUTDOWN_GRACE_S=str(grace)) as d:
        web = d.start_web()
        d.start_worker()
        await d.ready()
        account, key = await d.funded_key(10)
        streams = Streams(d, key, 3)
        await streams.streaming.wait()
        t0 = time.monotonic()
        web.signal(signal.SIGTERM)
        assert await web.exited(timeout=grace + 5) == 0, web.tail()
        took = time.monotonic() - t0
        results = await streams.results()
        assert all(s == 200 and not whole for s, _, _, whole in results)
        assert await d.metered(3) == 3
        rows = await d.books(account, FUNDS, [rid for _, rid, _, _ in results])
        assert {r["status"] for r in rows} == {"shutdown"}
        assert all(r["output_tokens"] > 0 and r["charge_micro"] == row_charge("gpt-test", r) for r in rows)
        # Within the grace period (plus the interpreter's own exit): the bound Heroku and docker keep.
        assert took < grace + 1.0, took
