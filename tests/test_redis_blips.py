"""Redis blips on the hot path: refused cleanly before a request, retried after one; the ledger stays conserved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
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
    """The gateway's Redis client, through the relay; the test's prefix is cleaned up directly."""
    client = aioredis.Redis(
        host="127.0.0.1", port=relay.port, decode_responses=True, socket_connect_timeout=0.5, socket_timeout=2
    )
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
