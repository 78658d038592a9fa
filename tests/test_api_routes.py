"""The routes besides the proxy over real HTTP: models, balance, count_tokens, health, readiness, metrics, 404s."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anthropic
import openai
import pytest
import redis.asyncio as aioredis

from gateway import tokens
from gateway.appkeys import REGISTRY
from ledger.keys import Keyspace
from tests.conftest import REDIS_URL
from tests.fakes.upstream import FakeUpstream
from tests.gateway_harness import Gateway, running_gateway

MODELS = ["claude-test", "deepseek-test", "gpt-test"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


@pytest.fixture
async def gw(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake) as g:
        yield g


def iso(value: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---- /v1/models ------------------------------------------------------------------------------------


async def test_models_in_openai_shape_list_the_registry(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    async with gw.http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == sorted(gw.app[REGISTRY].models) == MODELS
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        ids = [m.id async for m in client.models.list()]
    assert ids == MODELS


async def test_models_in_anthropic_shape_with_anthropic_version(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    h = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    async with gw.http.get(gw.url + "/v1/models", headers=h) as r:
        assert r.status == 200
        body = await r.json()
    assert [m["id"] for m in body["data"]] == MODELS
    assert (body["has_more"], body["first_id"], body["last_id"]) == (False, MODELS[0], MODELS[-1])
    for m in body["data"]:
        assert m["type"] == "model" and m["display_name"]
        iso(m["created_at"])
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        ids = [m.id async for m in client.models.list()]
    assert ids == MODELS


async def test_models_need_a_key(gw: Gateway) -> None:
    async with gw.http.get(gw.url + "/v1/models") as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "invalid_api_key"


# ---- /v1/balance -------------------------------------------------------------------------------------


async def test_balance_shape_lists_buckets_in_micro_units(gw: Gateway) -> None:
    key = await gw.funded_key(None)
    account = await gw.account_of(key)
    now = gw.ledger.now_ms()
    soon = await gw.ledger.credit(
        account, 5_000_000, reference="a", source="topup", expires_at_ms=now + 86_400_000
    )
    await gw.ledger.credit(
        account, 1_500_000, reference="b", source="grant", expires_at_ms=now + 30 * 86_400_000
    )
    for h in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
        async with gw.http.get(gw.url + "/v1/balance", headers=h) as r:
            assert r.status == 200
            body = await r.json()
        assert body["account_id"] == account and body["currency"] == "THB"
        assert (body["available_micro"], body["reserved_micro"]) == (6_500_000, 0)
        assert {b["source"] for b in body["buckets"]} == {"topup", "grant"}
        for b in body["buckets"]:
            assert {"bucket_id", "amount_micro", "remaining_micro", "expires_at", "source"} <= set(b)
            assert type(b["amount_micro"]) is int and type(b["remaining_micro"]) is int
            assert iso(b["expires_at"]).timestamp() * 1000 > now
        first = next(b for b in body["buckets"] if b["bucket_id"] == soon.bucket_id)
        assert (first["amount_micro"], first["remaining_micro"]) == (5_000_000, 5_000_000)
        assert all(type(v) is int for k, v in body.items() if k.endswith("_micro"))


async def test_balance_needs_a_key(gw: Gateway) -> None:
    async with gw.http.get(gw.url + "/v1/balance", headers={"Authorization": "Bearer sk-nope"}) as r:
        assert r.status == 401


# ---- /v1/messages/count_tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
async def test_count_tokens_answers_for_every_model_locally(
    gw: Gateway, fake: FakeUpstream, model: str
) -> None:
    key = await gw.funded_key(1)
    short: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hello there"}]}
    longer = {
        **short,
        "system": "You are a careful coding assistant.",
        "tools": [
            {
                "name": "bash",
                "description": "Run a command",
                "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
            }
        ],
    }
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        a = await client.messages.count_tokens(**short)
        b = await client.messages.count_tokens(**longer)
    assert a.input_tokens == tokens.count_anthropic_request(short) > 0
    assert b.input_tokens == tokens.count_anthropic_request(longer) > a.input_tokens
    assert fake.requests == []  # counted here, never forwarded
    bal = await gw.ledger.balance(await gw.account_of(key))
    assert (bal.available_micro, bal.reserved_micro) == (1_000_000, 0)
    assert await gw.metering() == []


async def test_count_tokens_with_beta_query_and_bearer_and_errors(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    body = {"model": "deepseek-test", "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(
        gw.url + "/v1/messages/count_tokens?beta=true", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 200
        assert (await r.json())["input_tokens"] > 0
    async with gw.http.post(
        gw.url + "/v1/messages/count_tokens", json={**body, "model": "nope"}, headers={"x-api-key": key}
    ) as r:
        assert r.status == 404
        err = await r.json()
        assert err["type"] == "error" and err["error"]["type"] == "not_found_error"
    async with gw.http.post(
        gw.url + "/v1/messages/count_tokens", json={"model": "gpt-test"}, headers={"x-api-key": key}
    ) as r:
        assert r.status == 400
        assert "messages" in (await r.json())["error"]["message"]
    async with gw.http.post(gw.url + "/v1/messages/count_tokens", json=body) as r:
        assert r.status == 401


# ---- health, readiness, HEAD / ---------------------------------------------------------------------


async def test_head_root_healthz_and_readyz(gw: Gateway) -> None:
    async with gw.http.head(gw.url + "/") as r:
        assert r.status == 200
    async with gw.http.get(gw.url + "/healthz") as r:
        assert r.status == 200 and (await r.json())["ok"] is True
    async with gw.http.get(gw.url + "/readyz") as r:
        assert r.status == 200 and await r.json() == {"ok": True, "redis": "ok", "ledger": "ok"}


class RedisTap:
    """A TCP forwarder in front of the real Redis that the test can cut and restore (same port)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_readyz_is_503_while_redis_is_unreachable(tmp_path: Path, fake: FakeUpstream) -> None:
    target = urlsplit(REDIS_URL)
    tap = RedisTap(target.hostname or "127.0.0.1", target.port or 6379)
    await tap.start()
    client = aioredis.Redis(
        host="127.0.0.1", port=tap.port, socket_connect_timeout=0.5, decode_responses=True
    )
    try:
        async with running_gateway(
            client, Keyspace(prefix=f"tready{tap.port}", shards=4), tmp_path, fake
        ) as gw:
            async with gw.http.get(gw.url + "/readyz") as r:
                assert r.status == 200
            await tap.cut()
            async with gw.http.get(gw.url + "/readyz") as r:
                assert r.status == 503
                assert await r.json() == {"ok": False, "redis": "unreachable"}
            async with gw.http.get(gw.url + "/healthz") as r:
                assert r.status == 200  # alive, just not ready
            await tap.start()  # Redis back on the same port: ready again
            async with gw.http.get(gw.url + "/readyz") as r:
                assert r.status == 200
    finally:
        await client.aclose()
        await tap.cut()


# ---- /metrics ------------------------------------------------------------------------------------


async def test_metrics_count_requests_and_tokens_by_model_without_account_ids(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(10)
    account = await gw.account_of(key)
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        async with gw.http.post(
            gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 200
            request_id = r.headers["x-request-id"]
    async with gw.http.post(gw.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 401
    await gw.settled(2)
    async with gw.http.get(gw.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert 'gateway_requests_total{route="/v1/chat/completions",status="200"} 2' in text
    assert 'gateway_requests_total{route="/v1/chat/completions",status="401"} 1' in text
    assert 'gateway_tokens_total{model="gpt-test",kind="output"} 84' in text  # 42 per DEFAULT_USAGE
    assert 'gateway_tokens_total{model="gpt-test",kind="input_cache_hit"} 512' in text
    assert re.search(r'gateway_charge_micro_total\{model="gpt-test"\} [1-9]\d*', text)
    assert "# TYPE gateway_requests_total counter" in text
    for secret in (account, key, request_id, "acc_", "sk-"):
        assert secret not in text
    # Every sample line is "name{labels} number": parseable Prometheus text.
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.e+]+", line), line


# ---- routing ---------------------------------------------------------------------------------------


async def test_query_strings_are_ignored_for_routing(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(10)
    body = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(gw.url + "/v1/messages?beta=true", json=body, headers={"x-api-key": key}) as r:
        assert r.status == 200
        assert (await r.json())["model"] == "claude-test"
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(
        gw.url + "/v1/chat/completions?api-version=2024-01-01",
        json=chat,
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        assert r.status == 200
    async with gw.http.get(gw.url + "/v1/models?limit=5", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("method", "path", "fmt"),
    [
        ("POST", "/v1/messages/batches", "anthropic"),
        ("GET", "/v1/messages/msg_123", "anthropic"),
        ("POST", "/v1/embeddings", "openai"),
        ("POST", "/v1/responses/input_items", "openai"),
    ],
)
async def test_unknown_v1_routes_are_404_in_the_client_format(
    gw: Gateway, method: str, path: str, fmt: str
) -> None:
    key = await gw.funded_key(1)
    async with gw.http.request(method, gw.url + path, json={}, headers={"x-api-key": key}) as r:
        assert r.status == 404
        assert r.headers["x-request-id"].startswith("req_")
        body = await r.json()
    if fmt == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    else:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "not_found"
    assert path.split("?")[0] in (body["error"]["message"])


async def test_unknown_route_surfaces_as_not_found_in_the_sdks(gw: Gateway) -> None:
    key = await gw.funded_key(1)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="gpt-test", input="x")
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as aclient:
        with pytest.raises(anthropic.NotFoundError):
            await aclient.messages.batches.retrieve("msgbatch_1")
