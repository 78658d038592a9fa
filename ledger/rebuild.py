"""Restore the live ledger in Redis from the SQLite history after Redis was lost.

Safe with traffic running: the epoch markers go first, so from then on every ledger script refuses
(requests get 503 "being restored", settlements wait in the web processes' spools); what the
surviving shards journaled is drained into SQLite; every remaining ledger key is deleted; the
restore runs; new markers go last, and the spools replay onto the restored ledger. A rebuild that
stops half way leaves a "rebuilding" key, so nothing adopts the half-restored ledger; run it again.

Every key and field is written as the Lua scripts write them (see ledger/lua/*.lua): accounts with
their counters, the sub index, buckets with their expiry indexes and credit references, live API keys,
open reservations, recent outcomes (so a retried settle still answers "exists"), refund records,
top-up records (with the pending index the Omise reconciliation reads).
The journal cursors are reset first: the streams start again from nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .epoch import clear_epoch, epochs, mark_rebuilding, new_epoch, write_epoch
from .keys import hash_subject
from .ledger import RESERVATION_TTL_S, Ledger
from .personal import new_account_key
from .reconcile import drain_all
from .redis_client import delete_keys, scan_keys
from .store import Store

__all__ = ["RebuildRefused", "RebuildResult", "RepairResult", "ledger_key_count", "rebuild", "repair"]

_CHUNK = 500


class RebuildRefused(Exception):
    """Rebuild would overwrite a live ledger."""


@dataclass(frozen=True, slots=True)
class RebuildResult:
    accounts: int
    buckets: int
    keys: int
    reservations: int

    def as_json(self) -> dict[str, int]:
        return {"accounts": self.accounts, "buckets": self.buckets}  # SPEC 6


async def ledger_key_count(ledger: Ledger, *, limit: int = 1) -> int:
    """How many of this ledger's keys exist (stops counting at `limit`)."""
    n = 0
    async for _ in scan_keys(ledger.redis, ledger.keys.pattern()):
        n += 1
        if n >= limit:
            break
    return n


class _ShardWrites:
    """Rebuild's writes, one pipeline per shard: each batch stays in one hash slot, so a Redis Cluster
    gets it on one node (no cross-slot batch). Every write sets a value outright: a retried batch is
    harmless."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._pipes: dict[str, Any] = {}
        self._pending: dict[str, int] = {}

    def pipe(self, pfx: str) -> Any:
        if pfx not in self._pipes:
            self._pipes[pfx] = self._redis.pipeline(transaction=False)
            self._pending[pfx] = 0
        return self._pipes[pfx]

    async def done(self, pfx: str) -> None:
        self._pending[pfx] += 1
        if self._pending[pfx] >= _CHUNK:
            await self._pipes.pop(pfx).execute()
            del self._pending[pfx]

    async def flush_all(self) -> None:
        for pfx, pipe in list(self._pipes.items()):
            if self._pending[pfx]:
                await pipe.execute()
        self._pipes.clear()
        self._pending.clear()


def _read_history(store: Store, now_ms: int, done_ttl_s: int) -> dict[str, list[Any]]:
    done_since = now_ms - done_ttl_s * 1000
    q = store.query
    return {
        "accounts": q(
            "SELECT a.*, t.credited, t.reserved, t.consumed, t.refunded, t.forfeited "
            "FROM accounts a LEFT JOIN account_totals t USING (account_id)"
        ),
        "available": q(
            "SELECT account_id, sum(remaining_micro) FROM buckets WHERE expires_ms > ? GROUP BY account_id",
            (now_ms,),
        ),
        "buckets": q("SELECT * FROM buckets"),
        "keys": q("SELECT * FROM api_keys"),
        "open": q("SELECT * FROM reservations WHERE status = 'open'"),
        "done": q(
            "SELECT * FROM reservations WHERE status IN ('settled', 'released') AND finished_ms > ?",
            (done_since,),
        ),
        "refunds": q("SELECT * FROM refunds"),
        "topups": q("SELECT * FROM topups"),
    }


async def rebuild(
    ledger: Ledger, store: Store, *, force: bool = False, actor: str = "system"
) -> RebuildResult:
    """Restore the ledger from SQLite. Refuses (RebuildRefused) when every shard still has its epoch
    marker (the ledger is whole) unless force: then the live ledger is replaced from SQLite after its
    journal is drained."""
    r, ks = ledger.redis, ledger.keys
    before = await epochs(ledger)
    whole = all(e is not None for e in before)
    if whole and not force:
        raise RebuildRefused(
            "the ledger is whole (every shard has its epoch marker); rebuild restores a lost one "
            "(--force replaces a live ledger from SQLite)"
        )
    await mark_rebuilding(ledger, True)
    await clear_epoch(ledger)  # every script refuses from here: nothing moves during the restore
    await drain_all(ledger, store)  # what the shards that kept their data journaled
    keep = {ks.shard_prefix(0) + "rebuilding"}
    batch: list[str] = []
    async for key in scan_keys(r, ks.pattern()):  # every primary of a cluster
        if key not in keep:
            batch.append(key)
        if len(batch) >= _CHUNK:
            await delete_keys(r, batch)  # one DEL per hash slot
            batch = []
    await delete_keys(r, batch)
    # The streams start again from nothing: forget where the old ones were, before anything new
    # can be journaled and drained.
    await asyncio.to_thread(store.reset_cursors)

    now = ledger.now_ms()
    h = await asyncio.to_thread(_read_history, store, now, ledger.done_ttl_s)
    available = {acct: int(total or 0) for acct, total in h["available"]}
    status_of = {a["account_id"]: a["status"] for a in h["accounts"]}
    writes = _ShardWrites(r)

    for a in h["accounts"]:
        acct = a["account_id"]
        pfx = ks.pfx_for(acct)
        pipe = writes.pipe(pfx)
        threshold = int(a["low_threshold_micro"] or 0)
        fields: dict[str, Any] = {
            "status": a["status"],
            "created_at": a["created_ms"],
            "credited": a["credited"] or 0,
            "reserved": a["reserved"] or 0,
            "consumed": a["consumed"] or 0,
            "refunded": a["refunded"] or 0,
            "forfeited": a["forfeited"] or 0,
            "low_threshold": threshold,
            # check_low's state: armed again only once the balance is back above the threshold.
            "low": "1" if threshold > 0 and available.get(acct, 0) < threshold else "0",
        }
        if a["status"] == "closed":
            fields["closed_at"] = a["closed_ms"] or 0
        else:
            sub = a["google_sub"] or ""
            fields["email"] = a["email"] or ""
            fields["sub_hash"] = hash_subject(sub) if sub else ""
            fields["pii_key"] = new_account_key()  # the journal starts empty: a fresh key seals from now
            if sub:
                pipe.set(pfx + "sub:" + hash_subject(sub), acct)
        pipe.hset(pfx + "a:" + acct, mapping=fields)
        pipe.sadd(pfx + "accounts", acct)
        await writes.done(pfx)

    for b in h["buckets"]:
        bid, acct = b["bucket_id"], b["account_id"]
        pfx = ks.pfx_for(acct)
        pipe = writes.pipe(pfx)
        remaining, expires = int(b["remaining_micro"]), int(b["expires_ms"])
        pipe.hset(
            pfx + "b:" + bid,
            mapping={
                "account": acct,
                "amount": b["amount_micro"],
                "remaining": remaining,
                "expires_at": expires,
                "source": b["source"],
                "ref": b["reference"],
                "created_at": b["created_ms"],
            },
        )
        pipe.zadd(pfx + "a:" + acct + ":bz", {bid: expires})
        # The sweep visits what is in bexp: every bucket that can still hold credit past its expiry
        # (an unexpired empty one can be refilled by a release before it expires).
        if status_of.get(acct) == "active" and (remaining > 0 or expires > now):
            pipe.zadd(pfx + "bexp", {bid: expires})
        if b["reference"]:
            pipe.set(pfx + "ref:" + b["reference"], bid)
        await writes.done(pfx)

    for k in h["keys"]:
        key_id, acct = k["key_id"], k["account_id"]
        pfx = ks.pfx_for(acct)
        pipe = writes.pipe(pfx)
        fields = {"account": acct, "prefix": k["prefix"], "created_at": k["created_ms"]}
        if k["last_used_ms"] is not None:
            fields["last_used_at"] = k["last_used_ms"]
        live = k["revoked_ms"] is None and status_of.get(acct) == "active"
        if live:
            fields["hash"] = k["key_hash"]
            pipe.hset(pfx + "kh:" + k["key_hash"], mapping={"account": acct, "key_id": key_id})
            pipe.hset(pfx + "a:" + acct + ":keys", key_id, k["key_hash"])
        else:
            fields["revoked_at"] = k["revoked_ms"] or now
        pipe.hset(pfx + "k:" + key_id, mapping=fields)
        await writes.done(pfx)

    # A process still streaming gets one heartbeat period to extend its hold before the stale
    # sweep would release it.
    min_deadline = now + RESERVATION_TTL_S * 1000
    for res in h["open"]:
        req, acct = res["request_id"], res["account_id"]
        pfx = ks.pfx_for(acct)
        pipe = writes.pipe(pfx)
        pipe.hset(
            pfx + "r:" + req,
            mapping={
                "account": acct,
                "key_id": res["key_id"] or "",
                "held": res["held_micro"],
                "draws": res["draws"] or "",
                "created_at": res["created_ms"],
            },
        )
        pipe.zadd(pfx + "rz", {req: max(int(res["deadline_ms"] or 0), min_deadline)})
        if res["key_id"]:
            pipe.sadd(pfx + "kr:" + res["key_id"], req)
        await writes.done(pfx)

    for res in h["done"]:
        req = res["request_id"]
        pfx = ks.pfx_for(res["account_id"])
        pipe = writes.pipe(pfx)
        if res["status"] == "settled":
            done: dict[str, Any] = {
                "outcome": "settled",
                "charged": res["charged_micro"] or 0,
                "shortfall": res["shortfall_micro"] or 0,
                "draws": res["final_draws"] or "",
            }
        else:
            done = {"outcome": "released"}
        pipe.hset(pfx + "rd:" + req, mapping=done)
        ttl_s = max(1, (int(res["finished_ms"]) + ledger.done_ttl_s * 1000 - now) // 1000)
        pipe.expire(pfx + "rd:" + req, ttl_s)
        await writes.done(pfx)

    for rf in h["refunds"]:
        pfx = ks.pfx_for(rf["account_id"])
        pipe = writes.pipe(pfx)
        pipe.hset(
            pfx + "rf:" + rf["refund_id"],
            mapping={
                "status": rf["status"],
                "amount": rf["amount_micro"],
                "bucket": rf["bucket_id"],
                "account": rf["account_id"],
            },
        )
        await writes.done(pfx)
    for tp in h["topups"]:
        tid, acct = tp["topup_id"], tp["account_id"]
        pfx = ks.pfx_for(acct)
        pipe = writes.pipe(pfx)
        pipe.hset(
            pfx + "t:" + tid,
            mapping={
                "account": acct,
                "amount": tp["amount_micro"],
                "minor": tp["amount_minor"],
                "currency": tp["currency"],
                "method": tp["method"],
                "status": tp["status"],
                "charge": tp["charge_id"] or "",
                "failure_code": tp["failure_code"] or "",
                "failure_message": tp["failure_message"] or "",
                "bucket": tp["bucket_id"] or "",
                "created_at": tp["created_ms"],
                "updated_at": tp["updated_ms"],
            },
        )
        pipe.zadd(pfx + "a:" + acct + ":tops", {tid: int(tp["created_ms"])})
        if tp["status"] == "pending":
            pipe.zadd(pfx + "tp", {tid: int(tp["created_ms"])})
        await writes.done(pfx)
    await writes.flush_all()
    # Last: the markers make the restored ledger live again (and the spools replay onto it).
    await write_epoch(ledger, new_epoch(now))
    await mark_rebuilding(ledger, False)

    result = RebuildResult(
        accounts=len(h["accounts"]),
        buckets=len(h["buckets"]),
        keys=len(h["keys"]),
        reservations=len(h["open"]),
    )
    await asyncio.to_thread(
        lambda: store.audit(
            actor=actor,
            action="rebuild",
            target="ledger",
            detail={
                "accounts": result.accounts,
                "buckets": result.buckets,
                "keys": result.keys,
                "open_reservations": result.reservations,
                "force": force,
                "shards_with_marker": sum(e is not None for e in before),
            },
            at_ms=now,
        )
    )
    return result


@dataclass(frozen=True, slots=True)
class RepairResult:
    problems_before: list[str]
    problems_after: list[str]
    rebuilt: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": not self.problems_after,
            "rebuilt": self.rebuilt,
            "problems_before": self.problems_before,
            "problems_after": self.problems_after,
        }


async def repair(ledger: Ledger, store: Store, *, actor: str = "system") -> RepairResult:
    """What reconcile flags, repaired from SQLite (the record of every applied journal event):
    drain, check; when anything is wrong, release holds past their deadline and check again; still
    wrong, replace the live ledger from SQLite (`rebuild --force`) and check again. Audited."""
    from .reconcile import reconcile

    before = await reconcile(ledger, store)
    if before.ok:
        return RepairResult([], [], rebuilt=False)
    released = await ledger.release_stale()
    mid = await reconcile(ledger, store) if released else before
    rebuilt = False
    if not mid.ok:
        await rebuild(ledger, store, force=True, actor=actor)
        rebuilt = True
    after = await reconcile(ledger, store) if (released or rebuilt) else mid
    await asyncio.to_thread(
        lambda: store.audit(
            actor=actor,
            action="repair",
            target="ledger",
            detail={
                "problems_before": before.problems[:50],
                "stale_holds_released": released,
                "rebuilt": rebuilt,
                "problems_after": after.problems[:50],
            },
            at_ms=ledger.now_ms(),
        )
    )
    return RepairResult(before.problems, after.problems, rebuilt)
