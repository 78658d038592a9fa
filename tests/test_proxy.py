"""End-to-end: clients over real HTTP -> gateway -> fake upstream (real SSE), billed to the micro-unit."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.clientbody import WHOLE_BELOW_BYTES
from gateway.sse import SSEParser
from gateway.usage import Usage, charge_micro
from ledger.keys import Keyspace
from tests.fakes.upstream import FakeUpstream, FakeUsage, Script, usage_for
from tests.gateway_harness import UPSTREAM_KEY, Gateway, running_gateway

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

PRICES = {  # micro-units per 1M tokens, as in gateway_harness.MODELS_TOML
    "gpt-test": dict(hit=1_500_000, miss=3_000_000, out=12_000_000),
    "deepseek-test": dict(hit=500_000, miss=2_000_000, out=8_000_000),
    "claude-test": dict(hit=3_000_000, miss=30_000_000, out=150_000_000, write=37_500_000),
}


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


def expected_charge(model: str, usage: Usage) -> int:
    return charge_micro(usage, **PRICES[model])


def chat(model: str = "gpt-test", stream: bool = False, **extra: object) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hi"}], **extra}


async def test_openai_stream_passes_upstream_bytes_through_and_bills_exactly(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    body = chat(stream=True, stream_options={"include_usage": True})
    async with gw.http.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        request_id = r.headers["x-request-id"]
        raw = await r.read()
    # Same format: what the upstream sent is what the client got, byte for byte.
    sent = fake.requests[-1]
    direct = await _direct(gw, fake, body)
    assert raw == direct
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.body["stream_options"] == {"include_usage": True}
    rows = await gw.settled()
    assert [r["request_id"] for r in rows] == [request_id]
    usage = usage_for(fake.script, "openai", stream=True, include_usage=True)
    assert usage is not None
    assert rows[0]["charge_micro"] == expected_charge("gpt-test", usage)
    assert rows[0]["status"] == "ok"
    assert (rows[0]["input_cache_hit_tokens"], rows[0]["output_tokens"]) == (usage.input_cache_hit, usage.output)
    bal = await gw.ledger.balance(await gw.account_of(key))
    assert bal.available_micro == 100_000_000 - rows[0]["charge_micro"]
    assert bal.reserved_micro == 0
    await gw.reconcile_ok()


async def test_a_same_format_body_goes_upstream_as_the_clients_own_bytes(gw: Gateway, fake: FakeUpstream) -> None:
    # Re-encoding an agent's 400 KB body costs half a parse: what the gateway does not change goes
    # on as the client wrote it (here Python's spaced JSON with escaped non-ASCII), and what it adds
    # (the output cap the hold was sized for) goes in front.
    key = await gw.funded_key(100)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = chat(stream=True, stream_options={"include_usage": True}, temperature=0.5)
    body["messages"] = [
        {"role": "user", "content": "Sawasdee \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \"hi\""},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "def f(x):\n    return x\n" * 800},  # an agent's size, past WHOLE_BELOW_BYTES
    ]
    raw = json.dumps(body, indent=1).encode()
    assert len(raw) >= WHOLE_BELOW_BYTES
    async with gw.http.post(gw.url + "/v1/chat/completions", data=raw, headers=headers) as r:
        assert r.status == 200
        await r.read()
    sent = fake.requests[-1].raw
    assert sent.startswith(b'{"max_tokens":') and sent.endswith(raw[1:])
    assert orjson.loads(sent) == {**body, "max_tokens": orjson.loads(sent)["max_tokens"]}
    # A cap the client set and the hold allows: nothing changes, not even a byte.
    raw = json.dumps({**body, "max_tokens": 64}).encode()
    async with gw.http.post(gw.url + "/v1/chat/completions", data=raw, headers=headers) as r:
        assert r.status == 200
        await r.read()
    assert fake.requests[-1].raw == raw
    # A renamed model is a replaced member: the edited object is encoded whole, exactly.
    raw = json.dumps({**body, "model": "deepseek-test"}).encode()
    async with gw.http.post(gw.url + "/v1/chat/completions", data=raw, headers=headers) as r:
        assert r.status == 200
        await r.read()
    assert fake.requests[-1].body["model"] == "deepseek-upstream"
    assert fake.requests[-1].body["messages"] == body["messages"]
    # A short body is read whole (cheaper than summarising it) and sent once as parsed, as orjson
    # writes it: a key written twice goes up once, with the value the gateway read.
    short = b'{"model": "gpt-test", "max_tokens": 64, "max_tokens": 32, "stream": true,' \
        b' "messages": [{"role": "user", "content": "hi"}]}'
    async with gw.http.post(gw.url + "/v1/chat/completions", data=short, headers=headers) as r:
        assert r.status == 200
        await r.read()
    assert fake.requests[-1].raw == orjson.dumps(
        {**orjson.loads(short), "stream_options": {"include_usage": True}}
    )
    await gw.settled()
    await gw.reconcile_ok()


async def _direct(gw: Gateway, fake: FakeUpstream, body: dict[str, object]) -> bytes:
    up = dict(body)
    up["stream_options"] = {"include_usage": True}
    async with gw.http.post(fake.openai_base_url + "/chat/completions", json=up) as r:
        return await r.read()


async def test_usage_chunk_is_hidden_from_a_client_that_did_not_ask(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(100)
    async with gw.http.post(
        gw.url + "/v1/chat/completions", json=chat(stream=True), headers={"Authorization": f"Bearer {key}"}
    ) as r:
        raw = await r.read()
    events = SSEParser().feed(raw)
    payloads = [orjson.loads(e.data) for e in events if e.data != b"[DONE]"]
    assert events[-1].data == b"[DONE]"
    assert all(p["choices"] for p in payloads), "the usage-only chunk leaked to the client"
    # ... but we asked the upstream for it, and billed from it.
    assert fake.requests[-1].body["stream_options"]["include_usage"] is True
    rows = await gw.settled()
    usage = usage_for(fake.script, "openai", stream=True, include_usage=True)
    assert usage is not None and rows[0]["charge_micro"] == expected_charge("gpt-test", usage)
    assert rows[0]["estimated"] in (0, False)


async def test_non_stream_echoes_client_model_and_bills_deepseek_cache_split(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script = Script(flavour="deepseek", usage=FakeUsage(input_cache_hit=700, input_cache_miss=300, output=55))
    key = await gw.funded_key(100)
    async with gw.http.post(
        gw.url + "/v1/chat/completions", json=chat("deepseek-test"), headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["model"] == "deepseek-test"
    assert fake.requests[-1].body["model"] == "deepseek-upstream"
    rows = await gw.settled()
    assert (rows[0]["input_cache_hit_tokens"], rows[0]["input_cache_miss_tokens"], rows[0]["output_tokens"]) == (700, 300, 55)
    expected = -(-(700 * 500_000 + 300 * 2_000_000 + 55 * 8_000_000) // 1_000_000)
    assert rows[0]["charge_micro"] == expected
    assert rows[0]["model"] == "deepseek-test" and rows[0]["upstream_model"] == "deepseek-upstream"


async def test_anthropic_stream_passthrough_bills_cache_read_and_write(gw: Gateway, fake: FakeUpstream) -> None:
    fake.script = Script(usage=FakeUsage(input_cache_hit=1000, input_cache_miss=20, cache_write=300, output=40))
    key = await gw.funded_key(100)
    body = {"model": "claude-test", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(
        gw.url + "/v1/messages?beta=true", json=body, headers={"x-api-key": key, "anthropic-version": "2023-06-01"}
    ) as r:
        assert r.status == 200
        raw = await r.read()
    events = SSEParser().feed(raw)
    assert events[0].event == "message_start" and events[-1].event == "message_stop"
    start = orjson.loads(events[0].data)
    assert start["message"]["model"] == "claude-test"
    assert fake.requests[-1].headers["x-api-key"] == UPSTREAM_KEY
    assert fake.requests[-1].body["model"] == "claude-upstream"
    rows = await gw.settled()
    row = rows[0]
    assert (row["input_cache_hit_tokens"], row["input_cache_miss_tokens"], row["output_tokens"]) == (1000, 320, 40)
    usage = Usage(input_cache_hit=1000, input_cache_miss=20, output=40, cache_write=300)
    assert row["charge_micro"] == expected_charge("claude-test", usage)
    await gw.reconcile_ok()


async def test_charge_is_drawn_from_the_soonest_expiring_bucket(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(None)
    account = await gw.account_of(key)
    now = gw.ledger.now_ms()
    late = await gw.ledger.credit(account, 50_000_000, reference="late", source="topup", expires_at_ms=now + 20 * 86400_000)
    soon = await gw.ledger.credit(account, 50_000_000, reference="soon", source="topup", expires_at_ms=now + 2 * 86400_000)
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    rows = await gw.settled()
    draws = orjson.loads(rows[0]["draws"])
    assert [d["bucket_id"] for d in draws] == [soon.bucket_id]
    buckets = {b.bucket_id: b for b in await gw.ledger.buckets(account)}
    assert buckets[late.bucket_id].remaining_micro == 50_000_000
    assert buckets[soon.bucket_id].remaining_micro == 50_000_000 - rows[0]["charge_micro"]


async def test_missing_and_revoked_keys_get_401_in_the_client_format(gw: Gateway) -> None:
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat()) as r:
        assert r.status == 401
        body = await r.json()
        assert body["error"]["type"] and "API key" in body["error"]["message"]
        assert r.headers["x-request-id"].startswith("req_")
    key = await gw.funded_key(10)
    ref = await gw.ledger.lookup_key(key)
    assert ref is not None
    await gw.ledger.revoke_key(ref.key_id)
    async with gw.http.post(gw.url + "/v1/messages", json={"model": "claude-test"}, headers={"x-api-key": key}) as r:
        assert r.status == 401
        body = await r.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"


async def test_bad_input_is_400_and_charges_nothing(gw: Gateway, fake: FakeUpstream) -> None:
    key = await gw.funded_key(10)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "'model'"),
        (orjson.dumps({"model": "gpt-test"}), "'messages'"),
        (orjson.dumps(chat(max_tokens=-5)), "max_tokens"),
    ]
    for raw, words in cases:
        async with gw.http.post(gw.url + "/v1/chat/completions", data=raw, headers=h) as r:
            assert r.status == 400, raw
            assert words in (await r.json())["error"]["message"]
    async with gw.http.post(gw.url + "/v1/messages", json={"model": "claude-test", "messages": [{"role": "user", "content": "x"}]},
                            headers={"x-api-key": key}) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat("no-such-model"), headers=h) as r:
        assert r.status == 404
        assert "no-such-model" in (await r.json())["error"]["message"]
    assert fake.requests == []
    assert await gw.metering() == []
    bal = await gw.ledger.balance(await gw.account_of(key))
    assert (bal.available_micro, bal.reserved_micro) == (10_000_000, 0)


async def test_body_over_the_limit_is_413(redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream) -> None:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, max_body_bytes=4096) as gw:
        key = await gw.funded_key(10)
        big = chat(messages=[{"role": "user", "content": "x" * 10_000}])
        async with gw.http.post(gw.url + "/v1/messages", json=big, headers={"x-api-key": key}) as r:
            assert r.status == 413
            body = await r.json()
            assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
        assert fake.requests == []


async def test_short_balance_is_402_and_a_thin_one_lowers_max_tokens(gw: Gateway, fake: FakeUpstream) -> None:
    broke = await gw.funded_key(None)
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {broke}"}) as r:
        assert r.status == 402
        assert r.headers["x-should-retry"] == "false"
        assert "Top up" in (await r.json())["error"]["message"]
    assert fake.requests == []
    # 0.01 THB = 10_000 micro: covers the prompt and ~800 output tokens at 12 THB/1M, not 4096.
    thin = await gw.funded_key(None, email="thin@example.com")
    account = await gw.account_of(thin)
    await gw.ledger.credit(account, 10_000, reference="thin", source="grant")
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=4096), headers={"Authorization": f"Bearer {thin}"}) as r:
        assert r.status == 200
    sent = fake.requests[-1].body["max_tokens"]
    assert 256 <= sent < 4096
    rows = await gw.settled()
    bal = await gw.ledger.balance(account)
    assert bal.available_micro == 10_000 - rows[0]["charge_micro"] >= 0
    await gw.reconcile_ok()


def _hhmm(minute_of_day: int) -> str:
    m = minute_of_day % 1440
    return f"{m // 60:02d}:{m % 60:02d}"


async def test_a_price_window_prices_requests_that_start_inside_it(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    import time

    now_min = int(time.time() // 60) % 1440
    inside = f"{_hhmm(now_min - 90)}-{_hhmm(now_min + 90)}"  # may wrap midnight: that is supported
    outside = f"{_hhmm(now_min + 180)}-{_hhmm(now_min + 300)}"
    extra = f"""
[models."ds-offpeak"]
provider = "fake-openai"
upstream_model = "ds"
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
[[models."ds-offpeak".price_windows]]
utc = "{inside}"
price_input_cache_hit = "0.25"
price_input_cache_miss = "1"
price_output = "4"

[models."ds-peak"]
provider = "fake-openai"
upstream_model = "ds"
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
[[models."ds-peak".price_windows]]
utc = "{outside}"
price_input_cache_hit = "0.25"
price_input_cache_miss = "1"
price_output = "4"
"""
    fake.script = Script(flavour="deepseek", usage=FakeUsage(input_cache_hit=1000, input_cache_miss=3000, output=777))
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, extra_models=extra) as gw:
        key = await gw.funded_key(10)
        for model in ("ds-offpeak", "ds-peak"):
            async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(model), headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
        rows = {r["model"]: r for r in await gw.settled(2)}
    usage = Usage(input_cache_hit=1000, input_cache_miss=3000, output=777)
    assert rows["ds-offpeak"]["charge_micro"] == charge_micro(usage, hit=250_000, miss=1_000_000, out=4_000_000)
    assert rows["ds-peak"]["charge_micro"] == charge_micro(usage, hit=500_000, miss=2_000_000, out=8_000_000)


async def test_a_key_revoked_elsewhere_stops_at_once_on_the_metered_path(gw: Gateway, fake: FakeUpstream) -> None:
    # The proxy remembers key -> account after the first request (no look-up round trip), so the
    # revocation must be caught by the reserve script itself, even when another process revoked it.
    key = await gw.funded_key(10)
    h = {"Authorization": f"Bearer {key}"}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(), headers=h) as r:
        assert r.status == 200
    ref = await gw.ledger.lookup_key(key)
    assert ref is not None
    await gw.ledger.revoke_key(ref.key_id)
    for _ in range(2):  # and it stays refused (the entry is dropped, then the look-up says no)
        async with gw.http.post(gw.url + "/v1/chat/completions", json=chat(), headers=h) as r:
            assert r.status == 401
            assert "revoked" in (await r.json())["error"]["message"]
    assert len(fake.requests) == 1
    rows = await gw.settled(1)
    assert len(rows) == 1
    bal = await gw.ledger.balance(ref.account_id)
    assert bal.reserved_micro == 0 and bal.available_micro == 10_000_000 - rows[0]["charge_micro"]
    await gw.reconcile_ok()
