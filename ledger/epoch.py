"""The ledger's epoch: a marker per shard that says "this Redis holds the shard's whole data".

Written once when a ledger is created and again, with a new value, at the end of every `rebuild`.
A Redis that restarted empty (no persistence, a lost volume, FLUSHALL, a replaced cluster node) has
no marker, and every Lua script refuses to act there (`{'no_ledger'}` -> LedgerLost): requests get a
503 "being restored" instead of 401s and free answers, settlements wait in the spool, the worker
applies nothing, and `rebuild` knows the ledger is lost without a --force.

Creation is told apart from loss by the SQLite history: no marker and no account in SQLite is a new
deployment (the marker is created); no marker but history is a lost ledger (left for `rebuild`).
A Redis that holds ledger keys but no marker at all is a ledger made before markers existed: adopted.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from enum import Enum

from .ledger import Ledger
from .redis_client import delete_keys
from .store import Store

__all__ = [
    "LedgerState",
    "clear_epoch",
    "epochs",
    "history_in",
    "is_whole",
    "mark_rebuilding",
    "new_epoch",
    "open_ledger",
    "write_epoch",
]


class LedgerState(Enum):
    WHOLE = "whole"  # every shard has its marker
    CREATED = "created"  # a new ledger: markers written now
    ADOPTED = "adopted"  # ledger keys from before markers existed: markers written now
    LOST = "lost"  # some shard has no marker while SQLite has history: run `rebuild`


def new_epoch(now_ms: int) -> str:
    return f"{now_ms}-{secrets.token_hex(6)}"


async def epochs(ledger: Ledger) -> list[str | None]:
    """Each shard's marker (None where it is missing), in one round trip."""
    pipe = ledger.redis.pipeline(transaction=False)
    for shard in ledger.keys.all_shards():
        pipe.get(ledger.keys.epoch(shard))
    got: list[str | None] = await pipe.execute()
    return got


async def is_whole(ledger: Ledger) -> bool:
    return all(e is not None for e in await epochs(ledger))


async def write_epoch(ledger: Ledger, value: str, *, only_missing: bool = False) -> None:
    pipe = ledger.redis.pipeline(transaction=False)
    for shard in ledger.keys.all_shards():
        pipe.set(ledger.keys.epoch(shard), value, nx=only_missing)
    await pipe.execute()


async def clear_epoch(ledger: Ledger) -> None:
    """From here every ledger script refuses: nothing moves while a rebuild replaces the data."""
    # One DEL per hash slot: a Redis Cluster refuses a DEL across slots.
    await delete_keys(ledger.redis, [ledger.keys.epoch(s) for s in ledger.keys.all_shards()])


def _rebuilding_key(ledger: Ledger) -> str:
    return ledger.keys.shard_prefix(0) + "rebuilding"


async def mark_rebuilding(ledger: Ledger, on: bool) -> None:
    """Set while a rebuild restores keys: a half-restored ledger must never be adopted as whole."""
    if on:
        await ledger.redis.set(_rebuilding_key(ledger), str(ledger.now_ms()))
    else:
        await ledger.redis.delete(_rebuilding_key(ledger))


def history_in(store: Store) -> Callable[[], Awaitable[bool]]:
    """`has_history` for open_ledger: does this SQLite file know any account?"""

    def known() -> bool:
        try:
            return bool(store.query("SELECT 1 FROM accounts LIMIT 1"))
        except sqlite3.OperationalError:
            return False  # no schema yet: a new deployment

    async def check() -> bool:
        return await asyncio.to_thread(known)

    return check


async def _has_ledger_keys(ledger: Ledger) -> bool:
    pipe = ledger.redis.pipeline(transaction=False)
    for shard in ledger.keys.all_shards():
        pipe.exists(ledger.keys.shard_prefix(shard) + "accounts")
    return any(await pipe.execute())


async def open_ledger(ledger: Ledger, has_history: Callable[[], Awaitable[bool]]) -> LedgerState:
    """At start-up (gateway, worker, ops CLI): create the markers of a new ledger, adopt a ledger
    from before markers, or report a lost one. `has_history`: does SQLite know any account?"""
    current = await epochs(ledger)
    if all(e is not None for e in current):
        return LedgerState.WHOLE
    if any(e is not None for e in current) or await ledger.redis.exists(_rebuilding_key(ledger)):
        return LedgerState.LOST  # some shards kept their data and some did not, or a rebuild stopped
    if await _has_ledger_keys(ledger):
        state = LedgerState.ADOPTED
    elif await has_history():
        return LedgerState.LOST
    else:
        state = LedgerState.CREATED
    # NX: two processes starting together agree on one value.
    await write_epoch(ledger, new_epoch(ledger.now_ms()), only_missing=True)
    return state
