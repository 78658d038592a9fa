"""The ledger's Redis client: one pool per process, and a retry for connections that went stale.

After Redis restarts, every pooled connection is dead but does not know it yet; without a retry each
one fails one command (a 503 for a request Redis would have served). Every ledger operation is
idempotent on its id, so re-sending a command on a fresh connection is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ["RETRIES", "log_redis_problems", "redis_client", "redis_problems"]

log = logging.getLogger("ledger.redis")

RETRIES = 3  # within ~1 s in all (50 ms, 100 ms, 200 ms, capped at 500 ms, with jitter)


def redis_client(url: str, *, pool_size: int = 64, pool_wait_s: float = 10.0) -> Redis:
    # Blocking pool: past its size a command waits for a free connection. redis-py's default pool
    # raises MaxConnectionsError at 100 in use, i.e. 500s beyond ~100 concurrent requests.
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        max_connections=pool_size,
        timeout=pool_wait_s,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError],
    )
    return Redis.from_pool(pool)


async def redis_problems(redis: Redis | RedisCluster) -> list[str]:
    """What is wrong with this Redis (every node of a cluster: a replica promoted later must persist
    too) as the ledger's store, one line each, see `_problems`."""
    if isinstance(redis, RedisCluster):
        out: list[str] = []
        for node in redis.get_nodes():

            async def config_get(name: str, node: ClusterNode = node) -> Any:
                return await redis.config_get(name, target_nodes=node)

            out.extend(f"node {node.name}: {line}" for line in await _problems(config_get))
        return out
    return await _problems(redis.config_get)


async def _problems(config_get: Callable[[str], Awaitable[Any]]) -> list[str]:
    """What is wrong with this Redis as the ledger's store, one line each (empty: nothing found).

    The ledger needs persistence (AOF, or at least RDB snapshots: the loss window is what a restart
    forgets) and `maxmemory-policy noeviction` (any evicting policy can drop an account, a bucket or
    a hold under memory pressure; noeviction refuses writes instead, which the spool survives).
    """
    try:
        got: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            for k, v in (await config_get(name)).items():
                got[str(k)] = str(v or "")
    except ResponseError:
        return ["cannot read the Redis configuration (CONFIG GET is not allowed here): make sure it has "
                "persistence (AOF) and maxmemory-policy noeviction"]
    problems = []
    aof = got.get("appendonly") == "yes"
    rdb = bool((got.get("save") or "").strip())
    if not aof and not rdb:
        problems.append(
            "Redis has no persistence (appendonly no, save ''): a restart loses the whole ledger until "
            "`python -m ledger rebuild`; set appendonly yes"
        )
    elif not aof:
        problems.append(
            "Redis persists by RDB snapshots only: a restart forgets the writes since the last snapshot "
            "(set appendonly yes; appendfsync everysec loses at most a second)"
        )
    policy = got.get("maxmemory-policy", "")
    if policy and policy != "noeviction":
        problems.append(
            f"Redis maxmemory-policy is {policy}: it may evict ledger keys (accounts, credit, holds) "
            "under memory pressure; set maxmemory-policy noeviction"
        )
    return problems


async def log_redis_problems(redis: Redis | RedisCluster) -> list[str]:
    problems = await redis_problems(redis)
    for line in problems:
        log.error("redis configuration: %s", line)
    return problems
