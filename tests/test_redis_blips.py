"""Redis blips on the hot path: refused cleanly before a request, retried after one; the ledger stays conserved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import PROXY
from ledger.connection import redis_client
from ledger.keys import Keyspace
from ledger.rebuild import rebuild
from tests.conftest import REDIS_URL
from tests.fakes.tcp_relay import TcpRelay
from tests.fakes.upstream import FakeUpstream, Script
from tests.gateway_harness import running_gateway


@pytest.fixture
async def relay() -> AsyncIterator[TcpRelay]:
    u = urlparse(REDIS_URL)
    r = TcpRelay(u.hostname or "127.0.0.1", u.port or 6379)
    await r.start()
    yield r
    await r.close()


@pytest.fixture
async def via_relay(relay: TcpRelay, keyspace: Keyspace) -> AsyncIterator[aioredis.Redis]:
    """The gateway's Redis client as production makes it, through the relay; the test's prefix is
    cleaned up directly."""
    client = redis_client(f"redis://127.0.0.1:{relay.port}/0")
    yield client
    await client.aclose()
    direct = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = [k async for k in direct.scan_iter(match=f"{keyspace.prefix}:*")]
    if keys:
        await direct.delete(*keys)
    await direct.aclose()


async def test_a_redis_blip_during_a_stream_is_retried_and_billed(
    relay: TcpRelay, via_relay: aioredis.Redis, keyspace: Keyspace, tmp_path: Path
) -> None:
    async with FakeUpstream(Script(text_chunks=6, chunk_delay_s=0.1)) as fake:
        async with running_gateway(via_relay, keyspace, tmp_path, fake) as gw:
            key = await gw.funded_key(10)
            account = await gw.account_of(key)
            body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            async with gw.http.post(
                gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status == 200
                await r.content.readany()
                relay.cut()  # Redis goes away while the answer streams
                asyncio.get_running_loop().call_later(3.0, relay.restore)  # outlasts redis-py's own retries
                raw = await r.read()
            assert raw.endswith(b"data: [DONE]\n\n")
            while not relay.up:  # the test's own reads go through the relay too
                await asyncio.sleep(0.05)
            rows = await gw.settled(1, timeout=15)
            assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["charge_micro"] > 0
            bal = await gw.ledger.balance(account)
            assert bal.reserved_micro == 0
            assert bal.available_micro == 10_000_000 - rows[0]["charge_micro"]
            await gw.reconcile_ok()


async def test_redis_down_before_a_request_is_503_in_the_client_format(
    relay: TcpRelay, via_relay: aioredis.Redis, keyspace: Keyspace, tmp_path: Path
) -> None:
    async with FakeUpstream() as fake, running_gateway(via_relay, keyspace, tmp_path, fake) as gw:
        key = await gw.funded_key(10)
        relay.cut()
        body = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
        async with gw.http.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": key}) as r:
            assert r.status == 503
            err = await r.json()
            assert err["type"] == "error" and err["error"]["type"] == "overloaded_error"
            assert "nothing was charged" in err["error"]["message"]
        assert fake.requests == []
        relay.restore()
        async with gw.http.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": key}) as r:
            assert r.status == 200
        await gw.settled(1)
        await gw.reconcile_ok()


async def test_a_client_leaving_while_its_hold_is_being_made_strands_nothing(
    relay: TcpRelay, via_relay: aioredis.Redis, keyspace: Keyspace, tmp_path: Path
) -> None:
    async with FakeUpstream() as fake, running_gateway(via_relay, keyspace, tmp_path, fake) as gw:
        key = await gw.funded_key(10)
        account = await gw.account_of(key)
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        h = {"Authorization": f"Bearer {key}"}
        async with gw.http.post(gw.url + "/v1/chat/completions", json=body, headers=h) as r:
            assert r.status == 200  # warms the key cache: the next request's first Redis call is the reserve
        await gw.settled(1)
        relay.hold_replies()  # Redis runs the reserve, its answer is slow to come back
        with pytest.raises(asyncio.TimeoutError):
            async with gw.http.post(
                gw.url + "/v1/chat/completions",
                json=body,
                headers=h,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as r:
                await r.read()
        await asyncio.sleep(0.2)
        relay.release_replies()
        for _ in range(100):  # released in the background as soon as the hold is known: no 5-minute wait
            bal = await gw.ledger.balance(account)
            if bal.reserved_micro == 0:
                break
            await asyncio.sleep(0.02)
        assert bal.reserved_micro == 0
        assert len(fake.requests) == 1  # the abandoned request never reached the upstream
        assert len(await gw.metering()) == 1
        await gw.reconcile_ok()


async def test_settlements_outlast_an_outage_longer_than_every_retry_budget(
    relay: TcpRelay, via_relay: aioredis.Redis, keyspace: Keyspace, tmp_path: Path
) -> None:
    async with FakeUpstream(Script(text_chunks=8, chunk_delay_s=0.1)) as fake:
        async with running_gateway(via_relay, keyspace, tmp_path, fake) as gw:
            key = await gw.funded_key(10)
            account = await gw.account_of(key)
            body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            started = asyncio.Event()
            streaming: list[int] = []

            async def one() -> str:
                async with gw.http.post(
                    gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as r:
                    assert r.status == 200
                    await r.content.readany()
                    streaming.append(1)
                    if len(streaming) == 4:
                        started.set()
                    assert (await r.read()).endswith(b"data: [DONE]\n\n")
                    return r.headers["x-request-id"]

            streams = [asyncio.get_running_loop().create_task(one()) for _ in range(4)]
            await started.wait()
            relay.cut()  # Redis is gone for longer than the settle retries: the settlements spool
            ids = await asyncio.gather(*streams)
            spool = gw.app[PROXY].spool
            assert spool is not None
            for _ in range(200):
                if len(spool.pending) == 4:
                    break
                await asyncio.sleep(0.02)
            assert sorted(spool.pending) == sorted(ids)
            assert spool.path.exists()  # on disk, not only in memory
            relay.restore()  # the keeper replays them within a second or so
            rows = await gw.settled(4, timeout=15)
            assert sorted(r["request_id"] for r in rows) == sorted(ids)
            assert all(r["status"] == "ok" and r["charge_micro"] > 0 for r in rows)
            async with gw.http.get(gw.url + "/metrics") as r:
                text = await r.text()
            assert "gateway_settlements_spooled_total 4" in text
            assert "gateway_settlements_replayed_total 4" in text
            bal = await gw.ledger.balance(account)
            assert bal.reserved_micro == 0
            assert bal.available_micro == 10_000_000 - sum(r["charge_micro"] for r in rows)
            await gw.reconcile_ok()


@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_a_ledger_that_lost_its_data_answers_503_being_restored_never_401(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with FakeUpstream() as fake, running_gateway(redis_client, clean_keyspace, tmp_path, fake) as gw:
        key = await gw.funded_key(10)
        account = await gw.account_of(key)
        other = await gw.funded_key(10, email="other@example.com")  # never used: not in the key cache
        anthropic = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
        openai = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        async with gw.http.post(gw.url + "/v1/messages", json=anthropic, headers={"x-api-key": key}) as r:
            assert r.status == 200
        await gw.settled(1)
        before = await gw.ledger.balance(account)
        # Redis restarts empty.
        lost = [k async for k in redis_client.scan_iter(match=clean_keyspace.pattern())]
        await redis_client.delete(*lost)
        for k in (key, other):
            async with gw.http.post(gw.url + "/v1/messages", json=anthropic, headers={"x-api-key": k}) as r:
                assert r.status == 503
                err = await r.json()
                assert err["type"] == "error" and err["error"]["type"] == "overloaded_error"
                assert "being restored" in err["error"]["message"]
            async with gw.http.post(
                gw.url + "/v1/chat/completions", json=openai, headers={"Authorization": f"Bearer {k}"}
            ) as r:
                assert r.status == 503
                assert "being restored" in (await r.json())["error"]["message"]
        async with gw.http.get(gw.url + "/v1/balance", headers={"Authorization": f"Bearer {other}"}) as r:
            assert r.status == 503
        async with gw.http.get(gw.url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["ledger"] == "being restored"
        assert len(fake.requests) == 1  # nothing was served free meanwhile
        await rebuild(gw.ledger, gw.store)
        async with gw.http.get(gw.url + "/readyz") as r:
            assert r.status == 200
        assert await gw.ledger.balance(account) == before
        async with gw.http.post(gw.url + "/v1/messages", json=anthropic, headers={"x-api-key": other}) as r:
            assert r.status == 200
        await gw.settled(2)
        await gw.reconcile_ok()
