"""The Lua script registry: each ``lua/*.lua`` file, with ``_lib.lua`` prepended, registered once.

redis-py's ``AsyncScript`` calls EVALSHA and reloads the script when Redis answers NOSCRIPT (after a
restart, a SCRIPT FLUSH, or a replica promoted in a cluster), so callers never see a lost script cache.
Each script's only declared key is its shard's journal stream; every key it touches is built from that
key's hash-tagged prefix, so one call stays in one hash slot (tests/test_cluster.py checks every key a
script touches against the slot of its KEYS[1]).
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .redis_client import AnyRedis, BoundedCluster
from .scriptlane import LaneUnavailable, ScriptLane

__all__ = ["SCRIPT_NAMES", "Scripts", "script_source"]

SCRIPT_NAMES = (
    "account_create",
    "account_close",
    "account_set",
    "key_create",
    "key_revoke",
    "credit",
    "reserve",
    "settle",
    "release",
    "refund",
    "refund_finish",
    "expire",
    "topup",
)


def script_source(name: str) -> str:
    lua = resources.files("ledger") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    def __init__(self, redis: AnyRedis, *, lane: bool = False) -> None:
        self._redis = redis
        self._scripts = {name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES}
        # A plain Redis over a socket (not a cluster, not fakeredis, which subclasses Redis): the
        # calls go down one pipelined connection first (ledger/scriptlane.py).
        self.lane = ScriptLane(redis.connection_pool) if lane and type(redis) is Redis else None

    async def aclose(self) -> None:
        if self.lane is not None:
            await self.lane.aclose()

    async def load(self) -> None:
        """SCRIPT LOAD every script up front, so the first calls need no NOSCRIPT round trip. On a
        cluster the client sends SCRIPT LOAD to every primary; a replica promoted later has an empty
        script cache (SCRIPT LOAD is not replicated), which the NOSCRIPT fallback below covers."""
        for script in self._scripts.values():
            await self._redis.script_load(script.script)

    def start(self, name: str, journal_key: str, *args: str | int) -> asyncio.Future[Any] | None:
        """The call sent down the lane without waiting: its reply's future (failing with
        LaneUnavailable when the lane cannot answer: then call it again the awaiting way); None when
        there is no connected lane."""
        if self.lane is None:
            return None
        return self.lane.start(self._scripts[name].sha, journal_key, [str(a) for a in args])

    async def __call__(self, name: str, journal_key: str, *args: str | int) -> Any:
        argv = [str(a) for a in args]
        if self.lane is not None:
            try:
                return await self.lane.evalsha(self._scripts[name].sha, journal_key, argv)
            except LaneUnavailable:
                pass  # redis-py answers: its reload on NOSCRIPT, its retries, its exceptions
            # (any other error reply is raised by the lane itself, as redis-py raises it)
        # AsyncScript reloads once on NOSCRIPT; a second flush racing that reload (a Redis restart,
        # an operator's SCRIPT FLUSH) gets one more try. The scripts are idempotent on their ids.
        for _ in range(2):
            try:
                return await self._replicated(await self._scripts[name](keys=[journal_key], args=argv), journal_key)
            except NoScriptError:
                continue
        return await self._replicated(await self._scripts[name](keys=[journal_key], args=argv), journal_key)

    async def _replicated(self, result: Any, journal_key: str) -> Any:
        # On a cluster with replicas a change is acknowledged once a replica has it too: Redis
        # replication is asynchronous, and a primary killed right after a settle would otherwise
        # take an answered request's charge with it.
        if isinstance(self._redis, BoundedCluster) and self._redis.wait_replicas:
            await self._redis.wait_for_replica(journal_key)
        return result
