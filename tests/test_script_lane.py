"""The script lane (ledger/scriptlane.py): the web process's ledger calls on one pipelined connection,
with redis-py answering whatever the lane cannot. Same answers, and nothing lost or mixed up when
callers leave, Redis flushes its scripts, stops answering, or dies and comes back."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from ledger import errors as LE
from ledger.connection import redis_client
from ledger.epoch import open_ledger
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.scriptlane import LaneUnavailable, ScriptLane
from tests.process_harness import RedisServer

# A socket is what the lane is for: real Redis only (fakeredis has no connection to take over).
real_redis = pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)


async def _no_history() -> bool:
    return False


@pytest.fixture
async def laned(redis_client: aioredis.Redis, clean_keyspace: Keyspace) -> AsyncIterator[Ledger]:
    led = Ledger(redis_client, clean_keyspace, script_lane=True)
    await open_ledger(led, _no_history)
    yield led
    await led.aclose()


@real_redis
async def test_the_lane_answers_what_redis_py_answers(laned: Ledger, redis_client: aioredis.Redis, clean_keyspace: Keyspace) -> None:
    plain = Ledger(redis_client, clean_keyspace)
    assert laned._scripts.lane is not None and plain._scripts.lane is None
    account, _ = await laned.create_account("lane@example.com")
    await laned.credit(account, 10_000, reference="lane-1", source="grant")
    assert await laned.reserve(account, "req_lane_1", 4_000) == 4_000
    assert await plain.reserve(account, "req_lane_1", 4_000) == 4_000  # the same hold, seen again
    with pytest.raises(LE.InsufficientFunds):
        await laned.reserve(account, "req_lane_2", 7_000)
    settled = await laned.settle(account, "req_lane_1", 1_234, metering={"request_id": "req_lane_1"})
    again = await plain.settle(account, "req_lane_1", 1_234, metering={"request_id": "req_lane_1"})
    assert (settled.charged_micro, settled.draws, again.already) == (1_234, again.draws, True)
    assert (await laned.balance(account)).available_micro == 10_000 - 1_234
    assert laned._scripts.lane._writer is not None  # it really went down the lane


@real_redis
async def test_callers_that_leave_do_not_mix_up_the_replies(laned: Ledger) -> None:
    account, _ = await laned.create_account("leave@example.com")
    await laned.credit(account, 10_000_000, reference="leave-1", source="grant")
    rng = random.Random(7)

    async def one(i: int) -> tuple[int, int]:
        return i, await laned.reserve(account, f"req_leave_{i}", 1_000 + i)

    tasks = [asyncio.create_task(one(i)) for i in range(300)]
    await asyncio.sleep(0)
    for task in rng.sample(tasks, 100):
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for result in done:
        if not isinstance(result, BaseException):
            i, held = result
            assert held == 1_000 + i  # every answer reached its own caller
    # The replies of the callers that left were read and dropped: the next calls line up.
    for i in range(300, 320):
        assert await laned.reserve(account, f"req_leave_{i}", 1_000 + i) == 1_000 + i


@real_redis
async def test_a_script_cache_flush_is_answered_by_redis_py_then_the_lane_again(laned: Ledger, redis_client: aioredis.Redis) -> None:
    account, _ = await laned.create_account("flush@example.com")
    await laned.credit(account, 10_000, reference="flush-1", source="grant")
    await redis_client.script_flush()
    assert await laned.reserve(account, "req_flush_1", 100) == 100  # NOSCRIPT: redis-py reloads
    lane = laned._scripts.lane
    assert lane is not None
    sha = laned._scripts._scripts["reserve"].sha
    assert await redis_client.script_exists(sha) == [True]
    assert await laned.reserve(account, "req_flush_2", 100) == 100


async def test_a_redis_that_dies_and_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", aof=True)
    server.start()
    client = redis_client(server.url)
    led = Ledger(client, Keyspace(prefix="lane"), script_lane=True)
    try:
        await open_ledger(led, _no_history)
        await led.load_scripts()
        account, _ = await led.create_account("dies@example.com")
        await led.credit(account, 1_000_000, reference="dies-1", source="grant")
        assert await led.reserve(account, "req_dies_1", 10) == 10
        server.kill()
        with pytest.raises(RedisConnectionError):  # redis-py's error, after redis-py's own retries
            await led.reserve(account, "req_dies_2", 10)
        server.start()  # from its AOF
        await asyncio.sleep(1.1)  # the lane waits a second after a failed connect
        assert await led.reserve(account, "req_dies_3", 10) == 10
        lane = led._scripts.lane
        assert lane is not None and lane._writer is not None  # back on the lane
        assert (await led.balance(account)).reserved_micro == 20
    finally:
        await led.aclose()
        await client.aclose()
        server.kill()


async def test_a_redis_that_stops_answering_times_the_lane_out(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", aof=False)
    server.start()
    client = redis_client(server.url)
    led = Ledger(client, Keyspace(prefix="lane"), script_lane=True)
    try:
        await open_ledger(led, _no_history)
        lane = led._scripts.lane
        assert lane is not None
        lane._timeout_s = 0.5
        account, _ = await led.create_account("stops@example.com")
        await led.credit(account, 1_000_000, reference="stops-1", source="grant")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(2.5, os.kill, server.proc.pid, signal.SIGCONT)
        # The lane gives up after its timeout; redis-py's call then waits for Redis to come back.
        assert await led.reserve(account, "req_stops_1", 10) == 10
        assert await led.reserve(account, "req_stops_2", 10) == 10
        assert (await led.balance(account)).reserved_micro == 20
    finally:
        await led.aclose()
        await client.aclose()
        server.kill()


@real_redis
async def test_a_closed_lane_sends_everything_to_redis_py(redis_client: aioredis.Redis) -> None:
    lane = ScriptLane(redis_client.connection_pool)
    await lane.aclose()
    with pytest.raises(LaneUnavailable):
        await lane.evalsha("0" * 40, "k", [])


@real_redis
async def test_an_error_reply_is_raised_as_redis_py_raises_it_and_not_run_twice(redis_client: aioredis.Redis) -> None:
    from redis.exceptions import ResponseError

    lane = ScriptLane(redis_client.connection_pool)
    counter = "lane:test:runs"
    await redis_client.delete(counter)
    # A script that writes, then fails: Redis keeps the write; running it again would write twice.
    sha = await redis_client.script_load("redis.call('INCR', KEYS[1]) return redis.error_reply('ERR boom')")
    try:
        with pytest.raises(ResponseError, match="boom"):
            await lane.evalsha(sha, counter, [])
        assert await redis_client.get(counter) == "1"
    finally:
        await lane.aclose()
        await redis_client.delete(counter)


@real_redis
async def test_a_closed_lane_lets_go_of_its_connection(redis_client: aioredis.Redis) -> None:
    lane = ScriptLane(redis_client.connection_pool)
    sha = await redis_client.script_load("return 1")
    assert await lane.evalsha(sha, "k", []) == 1
    writer = lane._writer
    assert writer is not None
    await lane.aclose()
    assert lane._writer is None and writer.is_closing()
    with pytest.raises(LaneUnavailable):
        await lane.evalsha(sha, "k", [])
