"""The one place a Redis client is made from ``REDIS_URL``: a single server, or any node of a Redis Cluster.

The gateway, the journal worker and the ops CLI all call `connect`. It asks the named node
``INFO cluster``; on ``cluster_enabled:1`` it returns a cluster client that discovers the other nodes
itself, so nothing else is configured (SPEC 2). Every ledger call touches one hash slot (see keys.py),
so the same code runs on both.

Both clients bound what is in flight and make the excess wait, rather than fail: redis-py's default
pools raise past their size (MaxConnectionsError, i.e. 500s under a burst). The cluster client also
rides out a primary's failover: a command that finds its primary gone is retried, with backoff, until
a replica has been promoted (or `FAILOVER_WAIT_S` passed). Retrying is safe because every ledger write
is idempotent on an id the caller chose (a request, a reference, a refund, a key id), and the other
writes are idempotent by nature (SET of the same value, ZADD XX, XTRIM MINID, DEL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from .connection import redis_client

__all__ = [
    "FAILOVER_WAIT_S",
    "POOL_SIZE",
    "POOL_WAIT_S",
    "AnyRedis",
    "connect",
    "delete_keys",
    "is_cluster",
    "scan_keys",
]

POOL_SIZE = 64
POOL_WAIT_S = 10.0
# A failed primary is replaced after cluster-node-timeout plus an election (about 2 s with the 1 s
# timeout our tests use, ~6 s with the 5 s the README recommends): commands wait that long, then fail.
FAILOVER_WAIT_S = 15.0
# How long a ledger write waits for a replica to have it before it is acknowledged anyway.
REPLICA_WAIT_MS = 250

AnyRedis = Redis | RedisCluster

# Errors after which the cluster may have changed under us: re-read the topology and try again.
_TRANSIENT = (ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError, TryAgainError, MasterDownError)


class _BoundedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, BoundedCluster)
        async with client.in_flight:
            result: list[Any] = await super().execute(raise_on_error, allow_redirections)
            return result


class BoundedCluster(RedisCluster):
    """RedisCluster with at most `max_in_flight` commands at a time (the rest wait) and retries that
    last through a failover. Each node's own connection cap stays above the bound, so it never raises."""

    def __init__(
        self, *args: Any, max_in_flight: int = POOL_SIZE, failover_wait_s: float = FAILOVER_WAIT_S, **kwargs: Any
    ) -> None:
        kwargs.setdefault("max_connections", max_in_flight + 16)
        super().__init__(*args, **kwargs)
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.failover_wait_s = failover_wait_s
        # Replicas a ledger write waits for (WAIT) before it is acknowledged: set by connect() when
        # every primary has one, so a primary that dies right after a settle does not take it along.
        self.wait_replicas = 0

    async def wait_for_replica(self, key: str) -> int:
        """WAIT on the node holding `key`, once and briefly: how many replicas have the writes so far.
        Best effort: a primary gone meanwhile answers nothing (0), as without WAIT."""
        try:
            async with self.in_flight:
                node = self.get_node_from_key(key)
                acked = await RedisCluster.execute_command(
                    self, "WAIT", self.wait_replicas, REPLICA_WAIT_MS, target_nodes=node
                )
                return int(acked)
        except (*_TRANSIENT, ResponseError, AttributeError):
            # ResponseError: the node became a replica meanwhile (WAIT is refused there).
            return 0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failover_wait_s
        delay = 0.05
        while True:
            try:
                async with self.in_flight:
                    return await super().execute_command(*args, **dict(kwargs))
            except (*_TRANSIENT, AttributeError):
                # AttributeError: redis-py 8.1's cluster client can hand out a connection that its
                # own failover clean-up (disconnect_free_connections) is closing at that moment; the
                # send then fails on a None writer, before anything reached Redis.
                # Not holding a slot of the bound while waiting: other shards keep working.
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self._initialize = True  # re-read which node serves which slot

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        # A transaction (MULTI/EXEC) must stay in one hash slot: redis-py refuses a cross-slot one.
        if shard_hint:
            raise ValueError("shard_hint is not supported on a cluster")
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py's own pipeline()


async def connect(
    url: str,
    *,
    pool_size: int = POOL_SIZE,
    pool_wait_s: float = POOL_WAIT_S,
    failover_wait_s: float = FAILOVER_WAIT_S,
) -> AnyRedis:
    """A client for `url` (decoded responses): a cluster client when the node says it is in a cluster.
    Raises redis' ConnectionError when the node does not answer."""
    if await _cluster_enabled(url):
        cluster = BoundedCluster.from_url(
            url,
            decode_responses=True,
            max_in_flight=pool_size,
            failover_wait_s=failover_wait_s,
            health_check_interval=30,
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
        )
        try:
            await cluster.initialize()
        except BaseException:
            await cluster.aclose()
            raise
        assert isinstance(cluster, BoundedCluster)  # from_url builds the class it is called on
        slots = cluster.nodes_manager.slots_cache.values()
        cluster.wait_replicas = 1 if slots and all(len(nodes) > 1 for nodes in slots) else 0
        return cluster
    # Blocking pool (past its size a command waits) with a retry for connections gone stale.
    return redis_client(url, pool_size=pool_size, pool_wait_s=pool_wait_s)


async def _cluster_enabled(url: str) -> bool:
    probe = Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10)
    try:
        info = await probe.info("cluster")
    except ResponseError:
        return False  # a server without the section (fakeredis, the embedded default)
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", "0")) == "1"


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


async def scan_keys(redis: Any, match: str, *, count: int = 1000) -> AsyncIterator[str]:
    """Every key matching `match`, on every primary of a cluster (redis-py's cluster SCAN visits each
    primary with its own cursor) or on the one server."""
    async for key in redis.scan_iter(match=match, count=count):
        yield key


async def delete_keys(redis: Any, keys: Iterable[str]) -> int:
    """DEL, one command per hash slot: a multi-key DEL across slots is refused by a cluster."""
    by_slot: dict[int, list[str]] = {}
    for key in keys:
        by_slot.setdefault(key_slot(key.encode()), []).append(key)
    n = 0
    for group in by_slot.values():
        n += int(await redis.delete(*group))
    return n

