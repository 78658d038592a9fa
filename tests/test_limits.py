"""What costs us without charging anyone is limited: wrong keys are throttled per address (in Redis,
shared by every web process), count_tokens has its own body cap and per-key concurrency, and
/metrics is not public."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from tests.fakes.upstream import FakeUpstream
from tests.gateway_harness import Gateway, running_gateway

COUNT = "/v1/messages/count_tokens"


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


def anthropic(key: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}


async def status_of(gw: Gateway, method: str, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
    async with gw.http.request(method, gw.url + path, **kw) as r:  # type: ignore[arg-type]
        return r.status, dict(r.headers), await r.read()


async def test_repeated_wrong_keys_are_throttled_per_address_across_processes(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, auth_failure_limit=5) as gw:
        good = await gw.funded_key(10)
        wrong = good[:-4] + "AAAA"
        for i, (path, headers) in enumerate(
            [("/v1/models", {"Authorization": f"Bearer {wrong}"}), ("/v1/chat/completions", {"Authorization": "Bearer nope"})] * 3
        ):
            method = "GET" if path == "/v1/models" else "POST"
            status, headers_back, body = await status_of(gw, method, path, headers=headers, data=b"{}")
            assert status == (401 if i < 5 else 429), (i, status, body)
        assert int(headers_back["Retry-After"]) >= 1 and b"Too many failed" in body
        # The right key from the blocked address is refused too: guessing learns nothing more.
        assert (await status_of(gw, "GET", "/v1/balance", headers={"Authorization": f"Bearer {good}"}))[0] == 429
        metrics = (await status_of(gw, "GET", "/metrics"))[2].decode()
        assert 'gateway_auth_failures_total{outcome="rejected"} 6' in metrics
        assert 'gateway_auth_failures_total{outcome="throttled"} 2' in metrics
        # The count lives in Redis, in the ledger's hash-tagged shard style, without the address.
        keys = [k async for k in redis_client.scan_iter(match=f"{clean_keyspace.prefix}:*authfail*")]
        assert len(keys) == 1 and re.fullmatch(rf"{clean_keyspace.prefix}:\{{s[0-9a-f]{{2}}\}}:authfail:[0-9a-f]{{32}}", keys[0])
        assert "127.0.0.1" not in keys[0] and 0 < await redis_client.pttl(keys[0]) <= 60_000
        # Another web process on the same Redis: one more failure from the address, and it blocks too.
        (tmp_path / "b").mkdir()
        async with running_gateway(
            redis_client, clean_keyspace, tmp_path / "b", fake, auth_failure_limit=5
        ) as other:
            assert (await status_of(other, "GET", "/v1/balance", headers={"Authorization": f"Bearer {good}"}))[0] == 200
            assert (await status_of(other, "GET", "/v1/models", headers={"Authorization": f"Bearer {wrong}"}))[0] == 429
            assert (await status_of(other, "GET", "/v1/balance", headers={"Authorization": f"Bearer {good}"}))[0] == 429


async def test_count_tokens_has_its_own_body_cap_and_per_key_concurrency(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    async with running_gateway(
        redis_client, clean_keyspace, tmp_path, fake, count_tokens_max_bytes=64 * 1024, count_tokens_concurrency=2
    ) as gw:
        key = await gw.funded_key(10)
        small = {"model": "claude-test", "messages": [{"role": "user", "content": "hello"}]}
        status, _, body = await status_of(gw, "POST", COUNT, headers=anthropic(key), data=orjson.dumps(small))
        assert status == 200 and orjson.loads(body)["input_tokens"] > 0
        # 30 MiB: refused on its Content-Length, and sent chunked (no length): refused once read, unparsed.
        big = orjson.dumps({**small, "messages": [{"role": "user", "content": "word " * (6 * 1024 * 1024)}]})
        status, _, body = await status_of(gw, "POST", COUNT, headers=anthropic(key), data=big)
        assert status == 413 and b"65536" in body

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 1 << 20):
                yield big[i : i + (1 << 20)]

        status, _, _ = await status_of(gw, "POST", COUNT, headers=anthropic(key), data=chunks())
        assert status == 413
        # Two counts of one key in flight (their bodies not yet sent): a third waits its turn with 429.
        host, port = gw.url.removeprefix("http://").split(":")
        payload = orjson.dumps(small)
        head = (
            f"POST {COUNT} HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + payload[:5])
            await writer.drain()
            held.append((reader, writer))
        async with asyncio.timeout(10):
            while (await status_of(gw, "POST", COUNT, headers=anthropic(key), data=payload))[0] != 429:
                await asyncio.sleep(0.01)  # until both held requests are inside the handler
        other = await gw.funded_key(10, email="other@example.com")
        assert (await status_of(gw, "POST", COUNT, headers=anthropic(other), data=payload))[0] == 200
        for reader, writer in held:
            writer.write(payload[5:])
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.close()
        assert (await status_of(gw, "POST", COUNT, headers=anthropic(key), data=payload))[0] == 200


async def test_metrics_need_the_token_or_a_local_scraper(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "token").mkdir()
    async with running_gateway(redis_client, clean_keyspace, tmp_path / "open", fake) as gw:
        assert (await status_of(gw, "GET", "/metrics"))[0] == 200  # a scraper on this machine
        forwarded = {"X-Forwarded-For": "203.0.113.7"}
        status, _, body = await status_of(gw, "GET", "/metrics", headers=forwarded)
        assert status == 403 and b"gateway_" not in body
    async with running_gateway(redis_client, clean_keyspace, tmp_path / "token", fake, metrics_token="s3cret-metrics") as gw:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-metrics"}):
            status, _, body = await status_of(gw, "GET", "/metrics", headers=headers)
            assert status == 401 and b"gateway_" not in body
        status, _, body = await status_of(
            gw, "GET", "/metrics", headers={"Authorization": "Bearer s3cret-metrics", **forwarded}
        )
        assert status == 200 and b"gateway_requests_total" in body
