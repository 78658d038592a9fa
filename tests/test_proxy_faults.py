"""Faults end to end: disconnects, upstream deaths, errors, timeouts, limits, crashes, shutdown; response and ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import tokens
from gateway.appkeys import METRICS
from gateway.middlewares import new_request_id
from gateway.sse import DONE, SSEEvent, SSEParser
from gateway.usage import Usage, charge_micro
from ledger.connection import redis_client
from ledger.journal import JournalWorker
from ledger.keys import Keyspace
from ledger.ledger import RESERVATION_TTL_S, Ledger
from ledger.reconcile import reconcile
from ledger.store import Store
from tests.fakes.upstream import FakeUpstream, FakeUsage, Script
from tests.gateway_harness import Gateway, running_gateway
from tests.process_harness import RedisServer

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

PRICES = {  # micro-units per 1M tokens, as in gateway_harness.MODELS_TOML
    "gpt-test": dict(hit=1_500_000, miss=3_000_000, out=12_000_000),
    "claude-test": dict(hit=3_000_000, miss=30_000_000, out=150_000_000, write=37_500_000),
}
# (client format, model): same format on both sides, and translated both ways.
ROUTES = [
    ("openai", "gpt-test"),
    ("anthropic", "claude-test"),
    ("anthropic", "gpt-test"),
    ("openai", "claude-test"),
]
ROUTE_IDS = [
    "openai-same",
    "anthropic-same",
    "anthropic-client-openai-upstream",
    "openai-client-anthropic-upstream",
]
FUNDS = 100_000_000  # funded_key(100)


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


# ----- helpers ------------------------------------------------------------------------------------


def path_for(fmt: str) -> str:
    return "/v1/messages" if fmt == "anthropic" else "/v1/chat/completions"


def headers_for(fmt: str, key: str) -> dict[str, str]:
    if fmt == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {key}"}


def body_for(fmt: str, model: str, *, stream: bool, max_tokens: int = 1000) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }


def events_of(raw: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(raw) + parser.close()


def stream_error(fmt: str, events: list[SSEEvent]) -> dict[str, Any]:
    """The well-formed in-stream error event in the client's format; fails when there is none."""
    for ev in events:
        if ev.data == DONE:
            continue
        obj = orjson.loads(ev.data)
        if fmt == "anthropic" and ev.event == "error":
            assert isinstance(obj["error"]["type"], str) and isinstance(obj["error"]["message"], str)
            return dict(obj["error"])
        if fmt == "openai" and ev.event is None and "error" in obj:
            assert isinstance(obj["error"]["type"], str) and isinstance(obj["error"]["message"], str)
            return dict(obj["error"])
    raise AssertionError(f"no {fmt} error event in the stream")


def assert_error_body(fmt: str, body: dict[str, Any]) -> dict[str, Any]:
    """A whole-response error in the client's format; returns its inner error object."""
    if fmt == "anthropic":
        assert body["type"] == "error", body
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str), body
    return dict(body["error"])


def row_charge(model: str, row: dict[str, Any]) -> int:
    """What the price table makes of the counts in a metering row (miss includes cache writes)."""
    write = row["cache_write_tokens"] or 0
    usage = Usage(
        row["input_cache_hit_tokens"], row["input_cache_miss_tokens"] - write, row["output_tokens"], write
    )
    return charge_micro(usage, **PRICES[model])


async def assert_books(gw: Gateway, key: str, charged: int) -> None:
    """Available is what was funded less what was charged, nothing stays reserved, reconcile is green."""
    bal = await gw.ledger.balance(await gw.account_of(key))
    assert (bal.available_micro, bal.reserved_micro) == (FUNDS - charged, 0)
    await gw.reconcile_ok()


async def read_some_then_hang_up(r: aiohttp.ClientResponse, frames: int) -> bytes:
    got = b""
    while got.count(b"\n\n") < frames:
        chunk = await r.content.readany()
        assert chunk, "the stream ended before the client hung up"
        got += chunk
    r.close()
    return got


# ----- client disconnect ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "model"), ROUTES, ids=ROUTE_IDS)
async def test_client_disconnect_cancels_upstream_and_charges_what_was_produced(
    gw: Gateway, fake: FakeUpstream, fmt: str, model: str
) -> None:
    text = "lorem ipsum dolor sit amet " * 40
    fake.script = Script(text=text, text_chunks=40, chunk_delay_s=0.05, usage=None)
    key = await gw.funded_key(100)
    async with gw.http.post(
        gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
    ) as r:
        assert r.status == 200
        request_id = r.headers["x-request-id"]
        seen = await read_some_then_hang_up(r, 6)
        hung_up = time.monotonic()
    # The rest of the stream would take ~2 s more: the gateway must hang up on the upstream at once.
    await fake.wait_disconnects(1, timeout=1.0)
    assert time.monotonic() - hung_up < 0.5
    assert fake.completed == 0
    rows = await gw.settled()
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == request_id
    assert row["status"] == "client_disconnect"
    assert row["estimated"] == 1  # no usage from the upstream: counted from the streamed text
    received = "".join(
        (orjson.loads(e.data).get("delta") or {}).get("text", "")
        if fmt == "anthropic"
        else "".join(c["delta"].get("content") or "" for c in orjson.loads(e.data)["choices"])
        for e in events_of(seen)
        if e.data != DONE and e.event in (None, "content_block_delta")
    )
    assert received and text.startswith(received)
    # At least what the client got, at most the whole text: what was produced before the hang-up.
    assert tokens.count_text(received) <= row["output_tokens"] < tokens.count_text(text)
    assert row["input_cache_miss_tokens"] > 0
    assert row["charge_micro"] == row_charge(model, row) > 0
    await assert_books(gw, key, row["charge_micro"])


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_client_giving_up_before_the_first_byte_cancels_upstream_and_charges_nothing(
    gw: Gateway, fake: FakeUpstream, fmt: str
) -> None:
    fake.script = Script(first_byte_delay_s=1.5)
    key = await gw.funded_key(100)
    model = "gpt-test" if fmt == "openai" else "claude-test"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await gw.http.post(
                gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
            )
    await fake.wait_disconnects(1, timeout=1.0)  # the upstream request went with it, not 1.5 s later
    rows = await gw.settled()
    assert [(r["status"], r["charge_micro"], r["output_tokens"]) for r in rows] == [
        ("client_disconnect", 0, 0)
    ]
    await assert_books(gw, key, 0)


# ----- upstream dies mid-stream --------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "model"), ROUTES, ids=ROUTE_IDS)
async def test_upstream_death_mid_stream_sends_an_error_event_and_settles_what_was_produced(
    gw: Gateway, fake: FakeUpstream, fmt: str, model: str
) -> None:
    fake.script = Script(text="alpha beta gamma delta epsilon zeta eta theta", text_chunks=8, die_after=5)
    key = await gw.funded_key(100)
    async with gw.http.post(
        gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
    ) as r:
        assert r.status == 200
        request_id = r.headers["x-request-id"]
        raw = await r.read()  # the gateway ends the stream properly even though the upstream did not
    events = events_of(raw)
    err = stream_error(fmt, events)
    assert "incomplete" in err["message"] or "ended" in err["message"]
    if fmt == "anthropic":
        assert events[0].event == "message_start"
        assert not any(e.event == "message_stop" for e in events)
    rows = await gw.settled()
    row = rows[0]
    assert row["request_id"] == request_id
    assert row["status"] == "upstream_error"
    assert row["output_tokens"] > 0  # some text was produced and streamed before the death
    assert row["charge_micro"] == row_charge(model, row) > 0
    await assert_books(gw, key, row["charge_micro"])


# ----- upstream error status before streaming ------------------------------------------------------


@pytest.mark.parametrize(("fmt", "model"), ROUTES, ids=ROUTE_IDS)
async def test_upstream_error_status_reaches_the_client_in_its_format_and_charges_nothing(
    gw: Gateway, fake: FakeUpstream, fmt: str, model: str
) -> None:
    key = await gw.funded_key(100)
    cases = [(500, 500), (429, 429), (400, 400), (401, 502), (402, 502)]
    ids = []
    for stream in (True, False):
        for up_status, client_status in cases:
            headers = (("retry-after", "7"),) if up_status == 429 else ()
            fake.enqueue(Script(status=up_status, error_message="upstream says no", error_headers=headers))
            async with gw.http.post(
                gw.url + path_for(fmt),
                json=body_for(fmt, model, stream=stream),
                headers=headers_for(fmt, key),
            ) as r:
                assert r.status == client_status, (up_status, stream)
                assert r.content_type == "application/json"
                err = assert_error_body(fmt, await r.json())
                ids.append(r.headers["x-request-id"])
                if up_status == 429:
                    assert r.headers["retry-after"] == "7"
                    assert err["type"] == "rate_limit_error"
                if client_status == 502:
                    # Our credentials or quota upstream: not the user's key, not the user's balance.
                    assert "upstream" in err["message"] and "upstream says no" not in err["message"]
                else:
                    assert err["message"] == "upstream says no"
    rows = await gw.settled(len(ids))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["status"] for r in rows} == {"upstream_error"}
    assert {r["charge_micro"] for r in rows} == {0}
    assert {r["output_tokens"] for r in rows} == {0}
    await assert_books(gw, key, 0)


# ----- connect failure, hang, stall ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_unreachable_upstream_is_502_and_charges_nothing(
    gw: Gateway, fake: FakeUpstream, fmt: str
) -> None:
    key = await gw.funded_key(100)
    await fake.close()  # the port is closed now: connection refused
    model = "gpt-test" if fmt == "openai" else "claude-test"
    async with gw.http.post(
        gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
    ) as r:
        assert r.status == 502
        err = assert_error_body(fmt, await r.json())
        assert err["type"] == "api_error" if fmt == "anthropic" else err["code"] == "upstream_error"
        request_id = r.headers["x-request-id"]
    rows = await gw.settled()
    assert [(x["request_id"], x["status"], x["charge_micro"]) for x in rows] == [
        (request_id, "upstream_error", 0)
    ]
    await assert_books(gw, key, 0)


@pytest.mark.parametrize(("fmt", "model"), ROUTES, ids=ROUTE_IDS)
async def test_upstream_that_never_answers_is_504_after_the_idle_timeout(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    fake: FakeUpstream,
    fmt: str,
    model: str,
) -> None:
    async with running_gateway(
        redis_client, clean_keyspace, tmp_path, fake, upstream_idle_timeout_s=0.5
    ) as gw:
        key = await gw.funded_key(100)
        ids = []
        for script in (Script(hang=True), Script(first_byte_delay_s=3.0)):
            fake.enqueue(script)
            t0 = time.monotonic()
            async with gw.http.post(
                gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
            ) as r:
                assert r.status == 504
                err = assert_error_body(fmt, await r.json())
                assert err["type"] == ("timeout_error" if fmt == "anthropic" else "server_error")
                ids.append(r.headers["x-request-id"])
            assert 0.4 < time.monotonic() - t0 < 2.0
        await fake.wait_disconnects(2)  # the gateway hung up on the silent upstream
        rows = await gw.settled(2)
        assert sorted((x["request_id"], x["status"], x["charge_micro"]) for x in rows) == sorted(
            (i, "upstream_timeout", 0) for i in ids
        )
        await assert_books(gw, key, 0)


@pytest.mark.parametrize(("fmt", "model"), ROUTES, ids=ROUTE_IDS)
async def test_upstream_stall_mid_stream_ends_with_an_error_event_and_upstream_timeout(
    redis_client: aioredis.Redis,
    clean_keyspace: Keyspace,
    tmp_path: Path,
    fake: FakeUpstream,
    fmt: str,
    model: str,
) -> None:
    async with running_gateway(
        redis_client, clean_keyspace, tmp_path, fake, upstream_idle_timeout_s=0.5
    ) as gw:
        fake.script = Script(text="one two three four five six seven eight", text_chunks=8, stall_after=5)
        key = await gw.funded_key(100)
        t0 = time.monotonic()
        async with gw.http.post(
            gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
        ) as r:
            assert r.status == 200
            request_id = r.headers["x-request-id"]
            raw = await r.read()
        assert 0.4 < time.monotonic() - t0 < 2.0
        err = stream_error(fmt, events_of(raw))
        if fmt == "anthropic":
            assert err["type"] == "timeout_error"
        assert "stopped sending" in err["message"]
        await fake.wait_disconnects(1)
        rows = await gw.settled()
        row = rows[0]
        assert (row["request_id"], row["status"]) == (request_id, "upstream_timeout")
        assert row["output_tokens"] > 0 and row["charge_micro"] == row_charge(model, row) > 0
        await assert_books(gw, key, row["charge_micro"])


# ----- per-key concurrency limit ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_per_key_concurrency_limit_is_429_in_the_client_format_and_frees_up(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream, fmt: str
) -> None:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, key_concurrency_limit=2) as gw:
        fake.script = Script(text_chunks=10, chunk_delay_s=0.05)
        key = await gw.funded_key(100)
        model = "gpt-test" if fmt == "openai" else "claude-test"

        async def one() -> tuple[int, str, bytes]:
            async with gw.http.post(
                gw.url + path_for(fmt), json=body_for(fmt, model, stream=True), headers=headers_for(fmt, key)
            ) as r:
                return r.status, r.headers["x-request-id"], await r.read()

        results = await asyncio.gather(one(), one(), one())
        assert sorted(s for s, _, _ in results) == [200, 200, 429]
        (_, refused_id, refused_body) = next(x for x in results if x[0] == 429)
        err = assert_error_body(fmt, orjson.loads(refused_body))
        assert err["type"] == "rate_limit_error" and "concurrent" in err["message"]
        assert len(fake.requests) == 2  # the refused one never reached the upstream
        # Once the two streams are done the key's slots are free again.
        status, late_id, _ = await one()
        assert status == 200
        rows = await gw.settled(3)
        ok_ids = {i for s, i, _ in results if s == 200} | {late_id}
        assert {r["request_id"] for r in rows} == ok_ids and refused_id not in ok_ids
        assert {r["status"] for r in rows} == {"ok"}
        await assert_books(gw, key, sum(r["charge_micro"] for r in rows))


# ----- a reservation left by a dead process -----------------------------------------------------------


async def test_reservation_of_a_dead_gateway_is_released_by_the_worker_after_its_deadline(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, key_concurrency_limit=1) as gw:
        key = await gw.funded_key(100)
        ref = await gw.ledger.lookup_key(key)
        assert ref is not None
        # What a gateway that crashed mid-request leaves behind: a hold nobody will settle or extend.
        dead = new_request_id()
        held = await gw.ledger.reserve(
            ref.account_id, dead, 5_000_000, key_id=ref.key_id, concurrency_limit=1
        )
        assert held == 5_000_000
        bal = await gw.ledger.balance(ref.account_id)
        assert (bal.available_micro, bal.reserved_micro) == (FUNDS - held, held)
        # It holds the key's only slot, so the user is refused meanwhile...
        async with gw.http.post(
            gw.url + path_for("openai"),
            json=body_for("openai", "gpt-test", stream=False),
            headers=headers_for("openai", key),
        ) as r:
            assert r.status == 429
        # ... and before its deadline the sweep leaves it alone (a live stream looks the same).
        assert await gw.ledger.release_stale() == 0
        # The worker's pass after the deadline releases it: a clock past the reservation's ttl.
        later = Ledger(redis_client, clean_keyspace, clock=lambda: time.time() + RESERVATION_TTL_S + 1)
        worker = JournalWorker(redis_client, clean_keyspace, gw.store, ledger=later)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(worker.run(stop, interval_s=0.05))
        try:
            async with asyncio.timeout(5):
                while (await gw.ledger.balance(ref.account_id)).reserved_micro:
                    await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
        await assert_books(gw, key, 0)
        held_rows = await asyncio.to_thread(
            gw.store.query, "SELECT status, reason FROM reservations WHERE request_id = ?", (dead,)
        )
        assert [tuple(r) for r in held_rows] == [("released", "abandoned")]
        # The slot is free again.
        async with gw.http.post(
            gw.url + path_for("openai"),
            json=body_for("openai", "gpt-test", stream=False),
            headers=headers_for("openai", key),
        ) as r:
            assert r.status == 200
        rows = await gw.settled()
        await assert_books(gw, key, rows[0]["charge_micro"])


# ----- graceful shutdown -------------------------------------------------------------------------------


async def _books_after_shutdown(
    redis_client: aioredis.Redis, keyspace: Keyspace, gw: Gateway, key: str
) -> list[dict[str, Any]]:
    """The gateway is gone: drain its journal into its SQLite file and check conservation there."""
    store = Store(gw.settings.history_target)
    try:
        await JournalWorker(redis_client, keyspace, store, ledger=gw.ledger).drain_once()
        report = await reconcile(gw.ledger, store)
        assert report.ok, report.problems
        bal = await gw.ledger.balance(await gw.account_of(key))
        rows = [dict(r) for r in await asyncio.to_thread(store.query, "SELECT * FROM metering", ())]
        assert bal.reserved_micro == 0
        assert bal.available_micro == FUNDS - sum(r["charge_micro"] for r in rows)
        return rows
    finally:
        store.close()


async def test_shutdown_lets_an_in_flight_stream_finish_and_settles_it(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script = Script(text_chunks=12, chunk_delay_s=0.08)
    started = asyncio.Event()
    async with aiohttp.ClientSession() as client:

        async def stream(gw: Gateway, key: str) -> tuple[int, str, bytes]:
            async with client.post(
                gw.url + path_for("openai"),
                json=body_for("openai", "gpt-test", stream=True),
                headers=headers_for("openai", key),
            ) as r:
                first = await r.content.readany()
                started.set()
                return r.status, r.headers["x-request-id"], first + await r.read()

        async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, shutdown_grace_s=5.0) as gw:
            key = await gw.funded_key(100)
            task = asyncio.get_running_loop().create_task(stream(gw, key))
            await started.wait()
            # Leaving the block runs runner.cleanup() with the stream in flight.
        status, request_id, raw = await task
    assert status == 200
    assert events_of(raw)[-1].data == DONE  # the whole answer arrived
    rows = await _books_after_shutdown(redis_client, clean_keyspace, gw, key)
    assert [(r["request_id"], r["status"]) for r in rows] == [(request_id, "ok")]
    assert rows[0]["charge_micro"] > 0


async def test_shutdown_past_the_grace_period_cuts_the_stream_and_still_settles_it(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    fake.script = Script(text="word " * 100, text_chunks=50, chunk_delay_s=0.2, usage=None)
    started = asyncio.Event()
    async with aiohttp.ClientSession() as client:

        async def stream(gw: Gateway, key: str) -> tuple[str, bytes, bool]:
            async with client.post(
                gw.url + path_for("anthropic"),
                json=body_for("anthropic", "claude-test", stream=True),
                headers=headers_for("anthropic", key),
            ) as r:
                got = await r.content.readany()
                started.set()
                try:
                    got += await r.read()
                except aiohttp.ClientPayloadError:
                    return r.headers["x-request-id"], got, False
                return r.headers["x-request-id"], got, True

        t0 = time.monotonic()
        async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, shutdown_grace_s=0.2) as gw:
            key = await gw.funded_key(100)
            task = asyncio.get_running_loop().create_task(stream(gw, key))
            await started.wait()
        # Grace (0.2 s) plus the runner's handler timeout (2 s), far less than the 10 s stream.
        assert time.monotonic() - t0 < 5.0
        request_id, raw, whole = await task
    assert not any(e.event == "message_stop" for e in events_of(raw))
    assert not whole
    await fake.wait_disconnects(1)
    rows = await _books_after_shutdown(redis_client, clean_keyspace, gw, key)
    assert len(rows) == 1 and rows[0]["request_id"] == request_id
    assert rows[0]["status"] == "shutdown"  # cut by our shutdown, not by the client
    assert rows[0]["output_tokens"] > 0 and rows[0]["charge_micro"] == row_charge("claude-test", rows[0]) > 0


# ----- request ids ---------------------------------------------------------------------------------------


async def test_every_response_carries_the_request_id_of_its_metering_row(
    gw: Gateway, fake: FakeUpstream
) -> None:
    key = await gw.funded_key(100)
    broke = await gw.funded_key(None, email="broke@example.com")
    billed: list[str] = []  # responses that reached the upstream: each has its metering row
    for fmt, model in ROUTES:
        for stream in (True, False):
            async with gw.http.post(
                gw.url + path_for(fmt),
                json=body_for(fmt, model, stream=stream),
                headers=headers_for(fmt, key),
            ) as r:
                assert r.status == 200
                await r.read()
                billed.append(r.headers["x-request-id"])
    fake.enqueue(Script(status=500), Script(die_after=3))
    for _ in range(2):
        async with gw.http.post(
            gw.url + path_for("openai"),
            json=body_for("openai", "gpt-test", stream=True),
            headers=headers_for("openai", key),
        ) as r:
            await r.read()
            billed.append(r.headers["x-request-id"])
    fake.script = Script(text_chunks=20, chunk_delay_s=0.05)
    async with gw.http.post(
        gw.url + path_for("anthropic"),
        json=body_for("anthropic", "claude-test", stream=True),
        headers=headers_for("anthropic", key),
    ) as r:
        billed.append(r.headers["x-request-id"])
        await read_some_then_hang_up(r, 3)
    # Refused before any credit was held: an id still, and no row.
    refused: list[str] = []
    cases: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("POST", "/v1/chat/completions", headers_for("openai", key), {"model": "gpt-test"}, 400),
        ("POST", "/v1/messages", {}, body_for("anthropic", "claude-test", stream=False), 401),
        (
            "POST",
            "/v1/chat/completions",
            headers_for("openai", broke),
            body_for("openai", "gpt-test", stream=False),
            402,
        ),
        (
            "POST",
            "/v1/messages",
            headers_for("anthropic", key),
            body_for("anthropic", "nope", stream=False),
            404,
        ),
        (
            "POST",
            "/v1/messages/count_tokens",
            headers_for("anthropic", key),
            {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]},
            200,
        ),
        ("GET", "/v1/models", headers_for("openai", key), None, 200),
        ("GET", "/v1/balance", headers_for("openai", key), None, 200),
        ("GET", "/healthz", {}, None, 200),
        ("GET", "/metrics", {}, None, 200),
        ("GET", "/v1/nowhere", {}, None, 404),
    ]
    for method, path, headers, body, status in cases:
        async with gw.http.request(method, gw.url + path, json=body, headers=headers) as r:
            assert r.status == status, path
            refused.append(r.headers["x-request-id"])
    rows = await gw.settled(len(billed))
    assert sorted(r["request_id"] for r in rows) == sorted(billed)
    assert len(set(billed + refused)) == len(billed) + len(refused)
    assert all(i.startswith("req_") for i in billed + refused)
    await assert_books(gw, key, sum(r["charge_micro"] for r in rows))


# ----- many streams against a balance that covers only some -----------------------------------------------


async def test_concurrent_streams_never_overdraw_and_every_charge_is_accounted(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, fake: FakeUpstream
) -> None:
    async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, key_concurrency_limit=100) as gw:
        fake.script = Script(
            text_chunks=8, chunk_delay_s=0.02, usage=FakeUsage(input_cache_miss=20, output=200)
        )
        key = await gw.funded_key(None)
        account = await gw.account_of(key)
        # Each request holds ~4.9k micro (its input plus 400 output tokens at 12/1M) and costs 2,460.
        funds = 100_000
        await gw.ledger.credit(account, funds, reference="some", source="grant")
        n = 60
        lowest: list[int] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                bal = await gw.ledger.balance(account)
                lowest.append(min(bal.available_micro, bal.reserved_micro))
                await asyncio.sleep(0.005)

        async def one(i: int) -> tuple[int, str]:
            fmt, model = ("openai", "gpt-test") if i % 2 else ("anthropic", "gpt-test")
            async with gw.http.post(
                gw.url + path_for(fmt),
                json=body_for(fmt, model, stream=True, max_tokens=400),
                headers=headers_for(fmt, key),
            ) as r:
                raw = await r.read()
                if r.status == 200:
                    assert b"error" not in raw
                return r.status, r.headers["x-request-id"]

        watcher = asyncio.get_running_loop().create_task(watch())
        results = await asyncio.gather(*(one(i) for i in range(n)))
        done.set()
        await watcher
        statuses = [s for s, _ in results]
        served = [i for s, i in results if s == 200]
        assert set(statuses) == {200, 402}, statuses  # the balance covered some, not all
        assert len(served) * 2_460 <= funds
        assert min(lowest) >= 0
        rows = await gw.settled(len(served))
        assert sorted(r["request_id"] for r in rows) == sorted(served)
        assert {r["status"] for r in rows} == {"ok"}
        charged = sum(r["charge_micro"] for r in rows)
        assert charged == len(served) * 2_460
        info = await gw.ledger.account(account)
        assert info is not None
        assert (info.consumed, info.reserved) == (charged, 0)
        bal = await gw.ledger.balance(account)
        assert bal.available_micro == funds - charged >= 0
        await gw.reconcile_ok()


@contextlib.asynccontextmanager
async def gateway_on_own_redis(
    tmp_path: Path, fake: FakeUpstream, prefix: str
) -> AsyncIterator[tuple[Gateway, RedisServer, aioredis.Redis]]:
    """A gateway on a redis-server of its own, for tests that stop it (SIGSTOP) or kill it."""
    server = RedisServer(tmp_path / "redis", aof=False)
    server.start()
    client = redis_client(server.url)
    try:
        async with running_gateway(client, Keyspace(prefix=prefix), tmp_path, fake) as gw:
            yield gw, server, client
    finally:
        await client.aclose()
        server.kill()


async def test_a_client_that_leaves_while_its_reserve_waits_for_redis_holds_nothing(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    # The reserve is sent, Redis is stopped (SIGSTOP) before it answers, the client gives up: the
    # handler is cancelled with the hold still to be made. Once Redis runs again the hold is made
    # and released at once, not left until the worker's stale sweep.
    async with gateway_on_own_redis(tmp_path, fake, "leaves") as (gw, server, client):
        key = await gw.funded_key(100)
        account = await gw.account_of(key)
        body = body_for("openai", "gpt-test", stream=True)
        async with gw.http.post(gw.url + "/v1/chat/completions", json=body, headers=headers_for("openai", key)) as r:
            assert r.status == 200  # warm: the key cached, the script lane connected
            await r.read()
        await gw.settled(1)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(asyncio.TimeoutError):
                async with aiohttp.ClientSession() as other:
                    await other.post(
                        gw.url + "/v1/chat/completions",
                        json=body,
                        headers=headers_for("openai", key),
                        timeout=aiohttp.ClientTimeout(total=0.5),
                    )
            await asyncio.sleep(0.3)  # the server sees the connection close and cancels
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        outcomes = []
        for _ in range(100):
            bal = await gw.ledger.balance(account)
            outcomes = [
                await client.hget(k, "outcome") async for k in client.scan_iter(match="*rd:*")  # (its own Redis)
            ]
            if bal.reserved_micro == 0 and len(outcomes) == 2:
                break
            await asyncio.sleep(0.05)
        assert bal.reserved_micro == 0
        assert sorted(outcomes) == ["released", "settled"]  # the second request's hold came and went
        assert len(await gw.metering(account)) == 1  # it never reached the upstream
        assert len(fake.requests) == 1
        await gw.reconcile_ok()


async def test_a_settlement_the_script_lane_cannot_answer_is_settled_once_the_awaiting_way(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    # A whole usage report makes the bill known at once: the settle goes down the script lane and
    # its reply is handled in a callback. Redis stopped (SIGSTOP) while the stream runs: the lane
    # gives up on the settle after its timeout, and the same bill goes through redis-py, which
    # waits for Redis to come back. One charge, one metering row, nothing left held.
    async with gateway_on_own_redis(tmp_path, fake, "lanefail") as (gw, server, _):
        lane = gw.ledger._scripts.lane
        assert lane is not None
        lane._timeout_s = 0.5
        key = await gw.funded_key(100)
        account = await gw.account_of(key)
        usage = FakeUsage(input_cache_hit=0, input_cache_miss=40, output=8)
        fake.script = Script(text="one two three four five six seven eight", text_chunks=8, chunk_delay_s=0.1, usage=usage)
        body = body_for("openai", "gpt-test", stream=True)
        assert server.proc is not None
        async with gw.http.post(gw.url + "/v1/chat/completions", json=body, headers=headers_for("openai", key)) as r:
            assert r.status == 200
            await r.content.readany()  # held, streaming
            os.kill(server.proc.pid, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(2.5, os.kill, server.proc.pid, signal.SIGCONT)
            await r.read()
        rows = await gw.settled(1, timeout=15)
        assert len(rows) == 1 and rows[0]["status"] == "ok"
        assert (rows[0]["input_cache_miss_tokens"], rows[0]["output_tokens"]) == (40, 8)
        assert rows[0]["charge_micro"] == row_charge("gpt-test", rows[0]) > 0
        bal = await gw.ledger.balance(account)
        assert (bal.available_micro, bal.reserved_micro) == (FUNDS - rows[0]["charge_micro"], 0)
        metrics = gw.app[METRICS]
        assert metrics.spooled == 0  # not spooled: settled by redis-py once Redis answered
        # (Redis ran the lane's copy too once it woke: the same request id, one charge. The
        # process knows it settled only through the awaiting way's answer.)
        assert metrics.tokens[(("model", "gpt-test"), ("kind", "output"))] == 8
        await gw.reconcile_ok()
