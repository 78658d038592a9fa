"""No content stored, enforced: a canary through every route and fault ends up in no log, Redis, SQLite, file or metric."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import BACKGROUND, PROXY
from ledger.keys import Keyspace
from tests import history
from tests.conftest import REDIS_URL
from tests.fakes.upstream import FakeToolCall, FakeUpstream, Script
from tests.gateway_harness import Gateway, running_gateway
from tests.history import history_dump

ROUTES = [
    ("openai", "gpt-test"),
    ("openai", "deepseek-test"),
    ("anthropic", "claude-test"),
    ("anthropic", "gpt-test"),
    ("openai", "claude-test"),
    ("responses", "deepseek-test"),
    ("responses", "claude-test"),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


class Records(logging.Handler):
    """Every record, at every level, kept whole (message, args, exception and stack text)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Records]:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    handler = Records()
    loggers = [logging.getLogger()] + [
        lg
        for lg in logging.root.manager.loggerDict.values()
        if isinstance(lg, logging.Logger) and not lg.propagate
    ]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# ----- what goes in ------------------------------------------------------------------------------------


def openai_body(c: str, model: str, *, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": 300,
        "messages": [
            {"role": "system", "content": f"You are the {c} assistant."},
            {"role": "user", "content": f"Look up {c}."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": orjson.dumps({"q": c}).decode()},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": f"found {c}"},
            {"role": "user", "content": [{"type": "text", "text": f"Again: {c}"}]},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": f"Looks up {c}.",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string", "description": c}},
                    },
                },
            }
        ],
    }


def anthropic_body(c: str, model: str, *, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": 300,
        "system": [{"type": "text", "text": f"You are the {c} assistant."}],
        "messages": [
            {"role": "user", "content": f"Look up {c}."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"Looking up {c}."},
                    {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": c}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": f"found {c}"},
                    {"type": "text", "text": f"Again: {c}"},
                ],
            },
        ],
        "tools": [
            {
                "name": "lookup",
                "description": f"Looks up {c}.",
                "input_schema": {"type": "object", "properties": {"q": {"type": "string", "description": c}}},
            }
        ],
    }


def responses_body(c: str, model: str, *, stream: bool) -> dict[str, Any]:
    """Shaped like Codex's second turn: instructions, messages, a call and its output, a custom tool."""
    return {
        "model": model,
        "stream": stream,
        "store": False,
        "instructions": f"You are the {c} assistant.",
        "prompt_cache_key": c,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Look up {c}."}]},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": f"about {c}"}], "encrypted_content": c},
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": orjson.dumps({"q": c}).decode()},
            {"type": "function_call_output", "call_id": "call_1", "output": f"found {c}"},
            {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": f"*** {c}"},
            {"type": "custom_tool_call_output", "call_id": "call_2", "output": f"patched {c}"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Again: {c}"}]},
        ],
        "tools": [
            {"type": "function", "name": "lookup", "description": f"Looks up {c}.",
             "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": c}}}},
            {"type": "custom", "name": "apply_patch", "description": f"Patches {c}."},
        ],
        "client_metadata": {"note": c},
    }


def body_for(fmt: str, c: str, model: str, *, stream: bool) -> dict[str, Any]:
    if fmt == "responses":
        return responses_body(c, model, stream=stream)
    return (
        anthropic_body(c, model, stream=stream)
        if fmt == "anthropic"
        else openai_body(c, model, stream=stream)
    )


def reply(c: str) -> Script:
    """The upstream's answer carries the canary too: reasoning, text, tool arguments, error messages."""
    return Script(
        text=f"The answer is {c}, as requested.",
        reasoning=f"Thinking about {c}.",
        tool_calls=(FakeToolCall(name="lookup", arguments=orjson.dumps({"q": c, "again": c}).decode()),),
        flavour="deepseek",
        error_message=f"upstream refused {c}",
    )


def path_for(fmt: str) -> str:
    return {"anthropic": "/v1/messages", "responses": "/v1/responses"}.get(fmt, "/v1/chat/completions")


def headers_for(fmt: str, key: str) -> dict[str, str]:
    if fmt == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


class Client:
    """Sends requests, keeps what came back, and the ids of those that must have a metering row."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.billed: list[str] = []
        self.received = b""

    async def send(
        self,
        fmt: str,
        key: str,
        payload: dict[str, Any] | bytes,
        *,
        path: str | None = None,
        billed: bool,
        hang_up_after: int | None = None,
    ) -> int:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        async with self.gw.http.post(
            self.gw.url + (path or path_for(fmt)), data=data, headers=headers_for(fmt, key)
        ) as r:
            if hang_up_after is None:
                self.received += await r.read()
            else:
                got = b""
                while got.count(b"\n\n") < hang_up_after:
                    chunk = await r.content.readany()
                    assert chunk, "the stream ended before the client hung up"
                    got += chunk
                r.close()
                self.received += got
            if billed:
                self.billed.append(r.headers["x-request-id"])
            return r.status


async def exercise(gw: Gateway, fake: FakeUpstream, c: str) -> Client:
    """Every route, success and error paths, with the canary everywhere it can be."""
    key = await gw.funded_key(100)
    broke = await gw.funded_key(None, email="broke@example.com")
    client = Client(gw)
    fake.script = reply(c)
    for fmt, model in ROUTES:
        for stream in (True, False):
            body = body_for(fmt, c, model, stream=stream)
            assert await client.send(fmt, key, body, billed=True) == 200
            if fmt == "openai" and stream:  # and the filtered re-framing for a client without usage
                fake.enqueue(replace(reply(c), flavour="openai"))
                assert await client.send(fmt, key, body, billed=True) == 200
            # Upstream errors (the upstream's message, which quotes the canary, goes to the client only).
            for status in (500, 400, 429):
                fake.enqueue(replace(reply(c), status=status))
                assert await client.send(fmt, key, body, billed=True) == status
            if stream:
                fake.enqueue(replace(reply(c), die_after=6))  # death mid-stream
                assert await client.send(fmt, key, body, billed=True) == 200
                fake.enqueue(replace(reply(c), error_after=6))  # an error event mid-stream
                assert await client.send(fmt, key, body, billed=True) == 200
                fake.enqueue(replace(reply(c), stall_after=6))  # idle timeout mid-stream
                assert await client.send(fmt, key, body, billed=True) == 200
                fake.enqueue(replace(reply(c), text_chunks=30, chunk_delay_s=0.03))  # the client hangs up
                assert await client.send(fmt, key, body, billed=True, hang_up_after=4) == 200
            fake.enqueue(replace(reply(c), hang=True))
            assert await client.send(fmt, key, body, billed=True) == 504
        # Refused before the upstream: bad requests quoting the canary, unknown model, no credit, too big.
        bad = body_for(fmt, c, model, stream=False)
        bad["max_output_tokens" if fmt == "responses" else "max_tokens"] = -1
        assert await client.send(fmt, key, bad, billed=False) == 400
        assert (
            await client.send(fmt, key, b'{"model": "' + c.encode() + b'", "messages": [', billed=False)
            == 400
        )
        assert await client.send(fmt, key, orjson.dumps([c]), billed=False) == 400
        assert await client.send(fmt, key, {"model": model, "messages": [c]}, billed=False) == 400
        assert await client.send(fmt, key, body_for(fmt, c, c, stream=True), billed=False) == 404
        assert await client.send(fmt, broke, body_for(fmt, c, model, stream=True), billed=False) == 402
        big = body_for(fmt, c, model, stream=True)
        if fmt == "responses":
            big["input"][0]["content"][0]["text"] = c * 3000
            # Stateful requests quote the canary back to no one: refused before anything is held.
            assert await client.send(fmt, key, {**bad, "max_output_tokens": 5, "store": True}, billed=False) == 400
            assert await client.send(fmt, key, {**bad, "max_output_tokens": 5, "previous_response_id": c}, billed=False) == 400
            compact = {**body_for(fmt, c, model, stream=False), "stream": None}
            del compact["stream"]
            assert await client.send(fmt, key, compact, path="/v1/responses/compact", billed=True) == 200
        else:
            big["messages"][0]["content"] = c * 3000
        assert await client.send(fmt, key, big, billed=False) == 413
    count = "/v1/messages/count_tokens"
    assert (
        await client.send(
            "anthropic", key, anthropic_body(c, "claude-test", stream=False), path=count, billed=False
        )
        == 200
    )
    assert (
        await client.send("anthropic", key, anthropic_body(c, c, stream=False), path=count, billed=False)
        == 404
    )
    assert (
        await client.send("anthropic", key, b'{"messages": "' + c.encode(), path=count, billed=False) == 400
    )
    return client


# ----- where it must not be -----------------------------------------------------------------------------


async def redis_dump(client: Any) -> list[bytes]:  # decoded or raw replies alike
    """Every key of the database and its whole value, read by type."""
    out: list[bytes] = []

    def b(v: Any) -> bytes:
        return v if isinstance(v, bytes) else str(v).encode()

    async for key in client.scan_iter(match="*", count=1000):
        out.append(b(key))
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            out.append(b(await client.get(key)))
        elif kind == "hash":
            out += [b(x) for kv in (await client.hgetall(key)).items() for x in kv]
        elif kind == "list":
            out += [b(x) for x in await client.lrange(key, 0, -1)]
        elif kind == "set":
            out += [b(x) for x in await client.smembers(key)]
        elif kind == "zset":
            out += [b(m) for m, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for eid, fields in await client.xrange(key, "-", "+"):
                out.append(b(eid))
                out += [b(x) for kv in fields.items() for x in kv]
        else:
            assert kind == "none", f"unexpected Redis type {kind}"  # deleted by another test meanwhile
    return out


def sqlite_dump(target: str) -> list[str]:
    return history_dump(target)


def record_text(record: logging.LogRecord) -> str:
    parts = [repr(record.msg), repr(record.args), record.getMessage(), record.stack_info or ""]
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(record.exc_info[1])))
    if record.exc_text:
        parts.append(record.exc_text)
    return "\n".join(parts)


async def settled_without_draining(gw: Gateway) -> None:
    """Wait for every settlement to land in Redis, leaving the journal streams undrained."""
    live: dict[str, str] = gw.app[PROXY].live
    background = gw.app[BACKGROUND]
    async with asyncio.timeout(10):
        while live or background:
            await asyncio.sleep(0.02)


async def test_canary_is_found_in_no_log_redis_key_sqlite_row_file_or_metric(
    redis_client: aioredis.Redis,
    redis_kind: str,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    fake: FakeUpstream,
    all_logs: Records,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    c = f"canary-{uuid.uuid4().hex}"
    cb = c.encode()
    raw_redis = aioredis.Redis.from_url(REDIS_URL) if redis_kind == "redis" else redis_client
    try:
        async with running_gateway(
            redis_client,
            clean_keyspace,
            tmp_path,
            fake,
            upstream_idle_timeout_s=0.5,
            max_body_bytes=64 * 1024,
        ) as gw:
            client = await exercise(gw, fake, c)
            # The canary did flow: the upstream got it, the client got the upstream's copy of it back.
            assert all(cb in r.raw for r in fake.requests)
            assert len(fake.requests) == len(client.billed)
            assert client.received.count(cb) > len(ROUTES)
            await settled_without_draining(gw)
            assert (
                await redis_client.xlen(clean_keyspace.journal(0))
                + sum(
                    [
                        await redis_client.xlen(clean_keyspace.journal(s))
                        for s in range(1, clean_keyspace.shards)
                    ]
                )
                > 0
            )
            before_drain = await redis_dump(raw_redis)
            assert any(clean_keyspace.prefix.encode() in k for k in before_drain)
            assert not [v for v in before_drain if cb in v], "canary in Redis (journal not yet drained)"
            rows = await gw.settled(len(client.billed))
            assert sorted(r["request_id"] for r in rows) == sorted(client.billed)
            assert {"ok", "upstream_error", "upstream_timeout", "client_disconnect"} <= {
                r["status"] for r in rows
            }
            assert not [v for v in await redis_dump(raw_redis) if cb in v], "canary in Redis"
            assert not [r for r in sqlite_dump(gw.settings.history_target) if c in r], "canary in SQLite"
            async with gw.http.get(gw.url + "/metrics") as r:
                metrics = await r.text()
            assert "gateway_requests_total" in metrics and c not in metrics
            await gw.reconcile_ok()
        # After shutdown (WAL checkpointed or not): no file the gateway wrote holds it, in any page.
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert history.POSTGRES or any(p.name.endswith(".sqlite3") for p in files)
        assert not [p.name for p in files if cb in p.read_bytes()], "canary on disk"
    finally:
        if raw_redis is not redis_client:
            await raw_redis.aclose()
    # Logs: every record of every logger at DEBUG, and whatever reached stdout/stderr.
    assert any("settled request_id=" in r.getMessage() for r in all_logs.records)
    assert not [r.name for r in all_logs.records if c in record_text(r)], "canary in a log record"
    assert c not in caplog.text
    out, err = capfd.readouterr()
    assert c not in out and c not in err


# ----- malformed HTTP: refused by the parser or while reading the body ------------------------------


def malformed_requests(key: str, c: str) -> list[tuple[str, bytes]]:
    """Requests aiohttp cannot parse (or whose body cannot be read), each carrying the canary and a
    real API key where a careless error path would quote them."""
    body = orjson.dumps(openai_body(c, "gpt-test", stream=False))
    line = "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
    auth = f"Authorization: Bearer {key}\r\n"
    json_ct = "Content-Type: application/json\r\n"

    def framed(headers: str, payload: bytes = body) -> bytes:
        return (line + headers + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload

    gzip_like = b"\x1f\x8b\x08\x00" + c.encode() + key.encode()
    return [
        ("key then a control character", framed(f"Authorization: Bearer {key}\x01\r\n{json_ct}")),
        ("x-api-key then DEL, canary after", framed(f"x-api-key: {key}\x7f{c}\r\n{json_ct}")),
        ("NUL inside a header", framed(f"{auth}X-Note: {c}\x00{key}\r\n{json_ct}")),
        ("header without a colon", framed(f"{auth}{c} {key}\r\n{json_ct}")),
        ("obsolete line folding", framed(f"{auth}X-Folded: a\r\n {c} {key}\r\n{json_ct}")),
        ("Content-Length too short", (line + auth + json_ct + "Content-Length: 12\r\n\r\n").encode() + body),
        ("Content-Length not a number", (line + auth + json_ct + f"Content-Length: 9{c}\r\n\r\n").encode() + body),
        (
            "bad chunk size",
            (line + auth + json_ct + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + f"zz{c}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        ),
        (
            "chunk longer than its size",
            (line + auth + json_ct + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"10\r\n" + body + b"\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding and Content-Length",
            (line + auth + json_ct + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n").encode()
            + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        ),
        ("oversized header", framed(f"{auth}X-Big: {c}{key}{'a' * 10_000}\r\n{json_ct}")),
        ("too many headers", framed(auth + "".join(f"X-{i}: {c}\r\n" for i in range(200)) + json_ct)),
        ("canary as the method", f"{c} /v1/models HTTP/1.1\r\nHost: gateway\r\n{auth}\r\n".encode()),
        ("canary in the version", f"GET /v1/models HTTP/1.{c}\r\nHost: gateway\r\n{auth}\r\n".encode()),
        ("control character in the path", f"GET /v1/{c}\x01{key} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()),
        ("gzip declared, not gzip", framed(f"{auth}{json_ct}Content-Encoding: gzip\r\nConnection: close\r\n")),
        (
            "gzip header, then garbage",
            framed(f"{auth}{json_ct}Content-Encoding: gzip\r\nConnection: close\r\n", gzip_like),
        ),
        ("deflate declared, not deflate", framed(f"{auth}{json_ct}Content-Encoding: deflate\r\nConnection: close\r\n")),
    ]


async def send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # until the server closes the connection
    finally:
        writer.close()


def responses_in(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        size = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:size]))
        raw = rest[size:]
    return out


async def test_malformed_http_puts_canary_and_key_in_no_log_store_or_response(
    redis_client: aioredis.Redis,
    redis_kind: str,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    fake: FakeUpstream,
    all_logs: Records,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    c = f"canary-{uuid.uuid4().hex}"
    raw_redis = aioredis.Redis.from_url(REDIS_URL) if redis_kind == "redis" else redis_client
    try:
        async with running_gateway(redis_client, clean_keyspace, tmp_path, fake) as gw:
            key = await gw.funded_key(100)
            secrets = (c.encode(), key.encode(), key[12:].encode())
            for name, data in malformed_requests(key, c):
                raw = await send_raw(gw.url, data)
                got = responses_in(raw)
                assert got, f"{name}: no response in {raw!r}"
                for status, headers, body in got:
                    assert 400 <= status < 500, (name, status, body)
                    assert headers.get("x-request-id", "").startswith("req_"), (name, headers)
                    assert not [s for s in secrets if s in body], f"{name}: echoed"
                assert got[-1][0] in (400, 413, 431), (name, got[-1][0])
            assert not fake.requests, "a malformed request reached the upstream"
            async with gw.http.get(gw.url + "/metrics") as r:
                metrics = await r.text()
            await gw.drain()
            dump = await redis_dump(raw_redis)
            assert not [v for v in dump if any(s in v for s in secrets)], "canary or key in Redis"
            assert not [r for r in sqlite_dump(gw.settings.history_target) if c in r or key in r]
            await gw.reconcile_ok()
        assert not any(s.decode() in metrics for s in secrets)
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert not [p.name for p in files if any(s in p.read_bytes() for s in secrets)], "on disk"
    finally:
        if raw_redis is not redis_client:
            await raw_redis.aclose()
    assert any("malformed request refused" in r.getMessage() for r in all_logs.records)
    leaked = [r.name for r in all_logs.records if c in record_text(r) or key[12:] in record_text(r)]
    assert not leaked, f"canary or key in log records of {leaked}"
    assert c not in caplog.text and key[12:] not in caplog.text
    out, err = capfd.readouterr()
    assert c not in out + err and key[12:] not in out + err


def test_aiohttp_loggers_lose_arguments_exceptions_and_stacks(all_logs: Records) -> None:
    from gateway.server import AIOHTTP_LOGGERS, quiet_aiohttp_loggers

    c = f"canary-{uuid.uuid4().hex}"
    quiet_aiohttp_loggers()
    quiet_aiohttp_loggers()  # idempotent
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        for level in (logging.DEBUG, logging.INFO, logging.ERROR):
            try:
                raise ValueError(f"bad bytes {c}")
            except ValueError as exc:
                logger.log(level, "Error handling request %s", c, exc_info=exc, stack_info=True)
    logging.getLogger("aiohttp.access").info(f'127.0.0.1 "POST /v1/x?{c} HTTP/1.1" 200')
    mine = [r for r in all_logs.records if r.name.startswith("aiohttp")]
    assert len(mine) == 3 * len(AIOHTTP_LOGGERS) + 1
    assert not [r.name for r in mine if c in record_text(r)]
    assert "Error handling request %s [ValueError]" in {r.getMessage() for r in mine}
