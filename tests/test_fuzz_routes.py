"""Bad input gets a 4xx and changes nothing: a few thousand seeded, fuzzed requests across the API
routes (chat completions, messages, responses, count_tokens, models, balance, the web JSON API, the
Omise webhook) find no response >= 500, leak no hold or concurrency slot, and leave the ledger conserved."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import BACKGROUND, PROXY
from ledger.keys import Keyspace
from tests.payments_harness import running_payments

SEED = 20_261_130
REQUESTS = 3000

OPENAI = {
    "model": "demo",
    "max_tokens": 1,
    "stream": False,
    "stream_options": {"include_usage": True},
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
    "tool_choice": "auto",
    "temperature": 0.5,
}
ANTHROPIC = {
    "model": "demo",
    "max_tokens": 1,
    "stream": True,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ],
    "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"q": {"type": "integer"}}}}],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "metadata": {"user_id": "u"},
}


RESPONSES = {
    "model": "demo",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    "instructions": "Be brief.",
    "max_output_tokens": 16,
    "stream": True,
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
    "reasoning": {"effort": "low"},
}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**53 + 1, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e308, 1e-300, 3.7])
    if kind in (4, 5):
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 32), rng.randrange(0x80, 0x3000)])) for _ in range(rng.randrange(0, 40)))
    if kind == 6:
        return rng.choice(["", "demo", "auto", "none", "user", "assistant", "tool", "text", "image", "{}", "[]"])
    if kind == 7:
        return []
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(1, 4))]
    return {rng.choice(["type", "text", "role", "content", "x", "include_usage", "name"]): random_value(rng, depth + 1) for _ in range(rng.randrange(1, 4))}


def deep_marker(depth: int) -> str:
    """Stands for JSON nested `depth` levels deep; encode() expands it (orjson.dumps stops at 254)."""
    return f"__deep_{depth}__"


def expand_deep(raw: bytes) -> bytes:
    for depth in (30, 70, 255, 600, 1000, 1100):
        marker = json.dumps(deep_marker(depth)).encode()
        raw = raw.replace(marker, b'{"a":[' * (depth // 2) + b"1" + b"]}" * (depth // 2))
    return raw


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if len(prefix) > 8:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def set_path(obj: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    for step in path[:-1]:
        obj = obj[step]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


def mutate(rng: random.Random, base: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(base)
    for _ in range(rng.randrange(1, 4)):
        where = paths(body)
        if not where:
            break
        path = rng.choice(where)
        roll = rng.random()
        if roll < 0.5:
            set_path(body, path, random_value(rng))
        elif roll < 0.7:
            set_path(body, path, None, delete=True)
        elif roll < 0.8:
            set_path(body, path, deep_marker(rng.choice([30, 70, 255, 600, 1000, 1100])))
        else:
            body[rng.choice(["stream_options", "stream", "max_tokens", "n", "system", "model", "tools"])] = random_value(rng)
    return body


def encode(rng: random.Random, body: Any) -> tuple[bytes, dict[str, str]]:
    raw = expand_deep(json.dumps(body, ensure_ascii=False).encode())
    headers = {"Content-Type": rng.choice(["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded", ""])}
    roll = rng.random()
    if roll < 0.04:
        headers["Content-Encoding"] = rng.choice(["gzip", "deflate", "br", "x-nonsense"])  # the body is not
    elif roll < 0.07:
        headers["Content-Encoding"] = "gzip"
        raw = gzip.compress(raw)
    elif roll < 0.09:
        headers["Content-Encoding"] = "deflate"
        raw = zlib.compress(raw)
    elif roll < 0.15:
        raw = raw[: rng.randrange(0, max(1, len(raw)))]  # truncated JSON
    elif roll < 0.18:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    elif roll < 0.21:
        raw = rng.choice([b"[]", b"null", b"1", b'"x"', b"[" * 2000 + b"]" * 2000, b"{" * 300])
    return raw, headers


@pytest.mark.slow
@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_thousands_of_fuzzed_requests_find_no_5xx_and_leak_nothing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    # Wrong keys are part of the fuzz; their throttle (tests/test_limits.py) would turn the rest into 429s.
    async with running_payments(
        redis_client, clean_keyspace, tmp_path, webhook_secret=None, auth_failure_limit=1_000_000
    ) as p:
        w, browser = p.w, p.browser
        await w.ledger.credit(p.account_id, 1_000_000_000, reference="fuzz", source="grant")
        key = (await browser.post("/api/keys", headers=p.csrf)).json()["key"]
        topup = await p.topup(500, method="promptpay")
        bucket = (await w.ledger.balance(p.account_id)).buckets[0].bucket_id
        event = orjson.loads(p.fake.build_event("charge.complete", p.charge_of(topup["topup_id"])))

        def v1_headers(fmt: str) -> dict[str, str]:
            h = {"Authorization": f"Bearer {key}"} if fmt == "openai" else {"x-api-key": key, "anthropic-version": "2023-06-01"}
            if rng.random() < 0.05:
                h = {rng.choice(["Authorization", "x-api-key"]): rng.choice(["", "Bearer", "Bearer cpk_", key + "x", "cpk_zz_" + "a" * 200])}
            if rng.random() < 0.1:
                h["anthropic-version"] = "".join(ch for ch in str(random_value(rng))[:50] if " " <= ch <= "~")
            return h

        def web_headers() -> dict[str, str]:
            return dict(p.csrf) if rng.random() < 0.9 else {"X-CSRF-Token": "forged"}

        routes: list[tuple[str, str, Any, Any]] = [
            ("POST", "/v1/chat/completions", OPENAI, lambda: v1_headers("openai")),
            ("POST", "/v1/messages", ANTHROPIC, lambda: v1_headers("anthropic")),
            ("POST", "/v1/messages/count_tokens", ANTHROPIC, lambda: v1_headers("anthropic")),
            ("POST", "/v1/responses", RESPONSES, lambda: v1_headers("openai")),
            ("GET", "/v1/models", None, lambda: v1_headers(rng.choice(["openai", "anthropic"]))),
            ("GET", "/v1/balance", None, lambda: v1_headers("openai")),
            ("POST", "/api/account/low-balance", {"amount": "50"}, web_headers),
            ("POST", "/api/topups", {"amount": 500, "method": "promptpay"}, web_headers),
            ("POST", "/api/keys", {}, web_headers),
            ("POST", f"/api/buckets/{bucket}/refund", {"amount": "1"}, web_headers),
            ("GET", "/api/usage", None, web_headers),
            ("GET", "/api/usage/daily", None, web_headers),
            ("GET", "/api/history", None, web_headers),
            ("GET", "/api/topups", None, web_headers),
            ("GET", f"/api/topups/{topup['topup_id']}", None, web_headers),
            ("POST", "/webhooks/omise", event, dict),
        ]
        queries = ["", "?days=7", "?days=-1", "?days=x", "?days=99999999999", "?limit=0&before=x",
                   "?limit=-5", "?before=1:credit:x", "?before=" + "9" * 40 + ":x", "?limit=1e9", "?format=xml"]
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        gate = asyncio.Semaphore(8)

        async def one(i: int, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> None:
            async with gate:
                try:
                    r = await browser.session.request(method, w.url + path, data=data, headers=headers, allow_redirects=False)
                    await r.read()
                    statuses[r.status] += 1
                    if r.status >= 500:
                        failures.append(f"#{i} {method} {path} -> {r.status}")
                except aiohttp.ClientError as exc:
                    failures.append(f"#{i} {method} {path} -> {type(exc).__name__} {headers} {(data or b'')[:60]!r}")

        jobs = []
        for i in range(REQUESTS):
            method, path, base, headers_for = rng.choice(routes)
            headers = headers_for()
            data = None
            if method == "GET":
                path += rng.choice(queries)
            elif isinstance(base, dict) and rng.random() < 0.9:
                data, extra = encode(rng, mutate(rng, base) if rng.random() < 0.85 else base)
                headers.update(extra)
                if path == "/webhooks/omise" and rng.random() < 0.3:
                    unknown = {**event, "data": {**event["data"], "id": f"chrg_test_{rng.randrange(10**12)}"}}
                    data = orjson.dumps(unknown)
            else:
                data, extra = encode(rng, random_value(rng))
                headers.update(extra)
            jobs.append(one(i, method, path, data, headers))
        await asyncio.gather(*jobs)

        assert failures == [], failures[:20]
        assert sum(statuses.values()) == REQUESTS
        assert statuses[200] > 100 and sum(n for s, n in statuses.items() if 400 <= s < 500) > REQUESTS // 3
        # Nothing held or leaked: every settlement landed, no reservation or key slot is open.
        async with asyncio.timeout(30):
            while w.app[PROXY].live or w.app[BACKGROUND]:
                await asyncio.sleep(0.05)
        info = await w.ledger.account(p.account_id)
        assert info is not None and info.reserved == 0
        assert [k async for k in redis_client.scan_iter(match=f"{clean_keyspace.prefix}:*:r:*")] == []
        assert [k async for k in redis_client.scan_iter(match=f"{clean_keyspace.prefix}:*:kr:*")] == []
        await w.drain()
        await p.reconciled()


async def test_the_known_500s_are_4xx_that_change_nothing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, webhook_secret=None) as p:
        w, browser = p.w, p.browser
        await w.ledger.credit(p.account_id, 100_000_000, reference="known", source="grant")
        key = (await browser.post("/api/keys", headers=p.csrf)).json()["key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        before = await w.ledger.account(p.account_id)

        async def post(path: str, data: bytes, headers: dict[str, str]) -> int:
            async with browser.session.post(w.url + path, data=data, headers=headers) as r:
                await r.read()
                return r.status

        base = {"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        # stream_options a string or a list: 400, and (16 times over) no hold or key slot is left.
        for so in ["yes", ["include_usage"], 1] * 6:
            for stream in (True, False):
                body = orjson.dumps({**base, "stream": stream, "stream_options": so})
                assert await post("/v1/chat/completions", body, auth) == 400
                anthropic = {**auth, "anthropic-version": "2023-06-01"}
                # Not an Anthropic field: dropped in translation (docs/translation.md), never a 5xx.
                assert await post("/v1/messages", body, anthropic) in (200, 400)
        assert await post("/v1/chat/completions", orjson.dumps(base), auth) == 200  # the key still works
        # JSON nested 100-1024 deep (orjson reads it; translation and counting would recurse past the
        # limit): a 400 where the body is translated or counted; a same-format request of an agent's
        # size is forwarded as the client wrote it (nothing of ours walks it), and the upstream
        # judges it; a short one is read whole and encoded again, which orjson does to 254 levels.
        padded = {**base, "messages": [{"role": "user", "content": "x " * 10_000}]}
        for depth in (100, 255, 600, 1024):
            deep = b'{"a":[' * (depth // 2) + b"1" + b"]}" * (depth // 2)
            body = orjson.dumps({**base, "tools": "@"}).replace(b'"@"', deep)
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                assert await post(path, body, {**auth, "anthropic-version": "2023-06-01"}) == 400, (depth, path)
            # (past orjson's own limit of 1,024 levels it is not JSON we can read: 400)
            assert await post("/v1/chat/completions", body, auth) == (200 if depth < 255 else 400), depth
            long_body = orjson.dumps({**padded, "tools": "@"}).replace(b'"@"', deep)
            assert await post("/v1/chat/completions", long_body, auth) == (200 if depth < 1024 else 400), depth
        # A gzip Content-Encoding on a body that is not gzip.
        for path in ("/v1/chat/completions", "/v1/messages/count_tokens", "/api/account/low-balance"):
            headers = {**auth, **p.csrf, "Content-Encoding": "gzip", "anthropic-version": "2023-06-01"}
            assert await post(path, orjson.dumps(base), headers) == 400, path
        # The Omise webhook naming a charge Omise does not know: acknowledged, nothing credited.
        unknown = "chrg_test_unknown000000001"
        event = p.fake.build_event("charge.complete", unknown, data={"object": "charge", "id": unknown})
        assert await post("/webhooks/omise", event, {"Content-Type": "application/json"}) == 200

        async with asyncio.timeout(30):
            while w.app[PROXY].live or w.app[BACKGROUND]:
                await asyncio.sleep(0.05)
        after = await w.ledger.account(p.account_id)
        assert after is not None and before is not None
        assert after.reserved == 0 and after.credited == before.credited
        assert [k async for k in redis_client.scan_iter(match=f"{clean_keyspace.prefix}:*:kr:*")] == []
        await w.drain()
        await p.reconciled()
