"""Shared fixtures: a real Redis (REDIS_URL or 127.0.0.1:6379) and fakeredis, each test on its own prefix.

A module that sets ``ON_CLUSTER = True`` runs its `redis_kind` tests a third time on a real 3-primary
Redis Cluster with replicas (tests/redis_cluster.py), started once per session when first needed."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

from ledger.epoch import open_ledger
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.redis_client import connect, delete_keys, scan_keys
from tests import history
from tests.redis_cluster import LocalCluster

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Engine-specific tests run on their engine only: deselected (not skipped) on the other."""
    other = "sqlite_only" if history.POSTGRES else "postgres_only"
    keep = [i for i in items if i.get_closest_marker(other) is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker(other) is not None])
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def _postgres_history_database() -> object:
    yield None
    history.drop_session_database()


class Clock:
    """A controllable clock: tests move time instead of sleeping."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test's own parametrize("redis_kind", ..., indirect=True) wins over this default.
    if "redis_kind" in metafunc.fixturenames and not any(
        "redis_kind" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")
    ):
        kinds = ["redis", "fakeredis"] + (["cluster"] if getattr(metafunc.module, "ON_CLUSTER", False) else [])
        metafunc.parametrize("redis_kind", kinds, indirect=True)


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
async def redis_client(redis_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    client: Any
    if redis_kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    elif redis_kind == "cluster":
        # The factory the gateway uses: it finds the cluster from one node's URL.
        client = await connect(request.getfixturevalue("redis_cluster").url)
    else:
        client = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def keyspace() -> Keyspace:
    return Keyspace(prefix=f"t{uuid.uuid4().hex[:10]}", shards=4)


@pytest.fixture
async def clean_keyspace(redis_client: aioredis.Redis, keyspace: Keyspace) -> AsyncIterator[Keyspace]:
    yield keyspace
    keys = [k async for k in scan_keys(redis_client, f"{keyspace.prefix}:*")]
    await delete_keys(redis_client, keys)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(redis_client: aioredis.Redis, clean_keyspace: Keyspace, clock: Clock) -> Ledger:
    led = Ledger(redis_client, clean_keyspace, clock=clock)
    await open_ledger(led, no_history)  # a new ledger: its epoch markers
    return led


async def no_history() -> bool:
    return False
