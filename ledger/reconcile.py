"""Conservation checks (SPEC 8): in Redis, in the history (SQLite or PostgreSQL), and that the two
agree once the journal is drained.

For every account: credited = available + reserved + consumed + refunded + forfeited, where credit
left in a bucket past its expiry instant counts as forfeited whether or not the sweep recorded it.
Problems are strings of ids and numbers only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Any

from .journal import JournalWorker, decode_draws
from .ledger import Ledger
from .store import Store

__all__ = [
    "AccountSnapshot",
    "Report",
    "check_redis",
    "check_sqlite",
    "drain_all",
    "reconcile",
    "redis_snapshot",
    "sqlite_snapshot",
]

COUNTERS = ("credited", "reserved", "consumed", "refunded", "forfeited")


@dataclass(slots=True)
class AccountSnapshot:
    """One account as one side sees it: counters, buckets {id: (amount, remaining, expires_ms)},
    open reservations {request_id: held}, live keys {key_id: hash}."""

    account_id: str
    status: str
    low_threshold: int
    counters: dict[str, int]
    buckets: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    open_held: dict[str, int] = field(default_factory=dict)
    live_keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Report:
    ok: bool
    accounts: int
    problems: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "accounts": self.accounts, "problems": self.problems}


# ----- snapshots --------------------------------------------------------------------------------


async def redis_snapshot(ledger: Ledger) -> dict[str, AccountSnapshot]:
    # The ledger's client decodes responses: every reply below is str (redis-py types say bytes | str).
    r = ledger.redis
    out: dict[str, AccountSnapshot] = {}
    for shard in ledger.keys.all_shards():
        pfx = ledger.keys.shard_prefix(shard)
        members: set[str] = await r.smembers(pfx + "accounts")
        for acct in sorted(members):
            h: dict[str, str] = await r.hgetall(pfx + "a:" + acct)
            if not h:
                out[acct] = AccountSnapshot(acct, "missing", 0, dict.fromkeys(COUNTERS, 0))
                continue
            snap = AccountSnapshot(
                account_id=acct,
                status=h.get("status", ""),
                low_threshold=int(h.get("low_threshold") or 0),
                counters={c: int(h.get(c) or 0) for c in COUNTERS},
            )
            for b in await ledger.buckets(acct):
                snap.buckets[b.bucket_id] = (b.amount_micro, b.remaining_micro, b.expires_at)
            snap.live_keys = await r.hgetall(pfx + "a:" + acct + ":keys")
            out[acct] = snap
        reqs: list[str] = await r.zrange(pfx + "rz", 0, -1)
        for req in reqs:
            got: list[str | None] = await r.hmget(pfx + "r:" + req, "account", "held")
            if got[0] is not None and got[0] in out:
                out[got[0]].open_held[req] = int(got[1] or 0)
    return out


def sqlite_snapshot(store: Store) -> dict[str, AccountSnapshot]:
    out: dict[str, AccountSnapshot] = {}
    with store.reader() as conn:
        for row in conn.execute(
            "SELECT a.account_id, a.status, a.low_threshold_micro, t.credited, t.reserved, t.consumed, "
            "t.refunded, t.forfeited FROM accounts a LEFT JOIN account_totals t USING (account_id)"
        ):
            out[row["account_id"]] = AccountSnapshot(
                account_id=row["account_id"],
                status=row["status"],
                low_threshold=int(row["low_threshold_micro"]),
                counters={c: int(row[c] or 0) for c in COUNTERS},
            )
        for row in conn.execute(
            "SELECT bucket_id, account_id, amount_micro, remaining_micro, expires_ms FROM buckets"
        ):
            if row["account_id"] in out:
                out[row["account_id"]].buckets[row["bucket_id"]] = (
                    int(row["amount_micro"]),
                    int(row["remaining_micro"]),
                    int(row["expires_ms"]),
                )
        for row in conn.execute(
            "SELECT request_id, account_id, held_micro FROM reservations WHERE status = 'open'"
        ):
            if row["account_id"] in out:
                out[row["account_id"]].open_held[row["request_id"]] = int(row["held_micro"])
        for row in conn.execute("SELECT key_id, account_id, key_hash FROM api_keys WHERE revoked_ms IS NULL"):
            if row["account_id"] in out:
                out[row["account_id"]].live_keys[row["key_id"]] = row["key_hash"]
    return out


# ----- conservation on one side -----------------------------------------------------------------


def _conservation(side: str, snap: AccountSnapshot, now_ms: int) -> list[str]:
    acct, c = snap.account_id, snap.counters
    problems = []
    available = sum(rem for _, rem, exp in snap.buckets.values() if exp > now_ms)
    expired_unswept = sum(rem for _, rem, exp in snap.buckets.values() if exp <= now_ms)
    rhs = available + c["reserved"] + c["consumed"] + c["refunded"] + c["forfeited"] + expired_unswept
    if c["credited"] != rhs:
        problems.append(
            f"{side} {acct}: credited {c['credited']} != available {available} + reserved {c['reserved']}"
            f" + consumed {c['consumed']} + refunded {c['refunded']} + forfeited {c['forfeited']}"
            f" + expired unswept {expired_unswept} (= {rhs})"
        )
    amounts = sum(a for a, _, _ in snap.buckets.values())
    if c["credited"] != amounts:
        problems.append(f"{side} {acct}: credited {c['credited']} != sum of bucket amounts {amounts}")
    held = sum(snap.open_held.values())
    if c["reserved"] != held:
        problems.append(f"{side} {acct}: reserved {c['reserved']} != held by open reservations {held}")
    for name, value in c.items():
        if value < 0:
            problems.append(f"{side} {acct}: {name} is negative ({value})")
    for bid, (amount, rem, _) in sorted(snap.buckets.items()):
        if rem < 0:
            problems.append(f"{side} {acct}: bucket {bid} remaining {rem} is negative")
        if rem > amount:
            problems.append(f"{side} {acct}: bucket {bid} remaining {rem} exceeds its amount {amount}")
    return problems


def _redis_problems(snaps: dict[str, AccountSnapshot], now_ms: int) -> list[str]:
    problems: list[str] = []
    for snap in snaps.values():
        if snap.status == "missing":
            problems.append(f"redis {snap.account_id}: listed in the accounts set but has no hash")
            continue
        problems.extend(_conservation("redis", snap, now_ms))
    return problems


async def check_redis(ledger: Ledger, *, now_ms: int | None = None) -> list[str]:
    now = ledger.now_ms() if now_ms is None else now_ms
    return _redis_problems(await redis_snapshot(ledger), now)


def check_sqlite(store: Store, *, now_ms: int | None = None) -> list[str]:
    """Conservation from the history's totals (SQLite or PostgreSQL, as the messages say), and the
    totals against the rows they summarise."""
    history = history_name(store)
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    problems: list[str] = []
    snaps = sqlite_snapshot(store)
    for snap in snaps.values():
        problems.extend(_conservation(history, snap, now_ms))
    sums: dict[str, dict[str, int]] = {
        a: dict.fromkeys(("consumed", "refunded", "forfeited"), 0) for a in snaps
    }
    for sql, name in (
        ("SELECT account_id, sum(charge_micro) FROM metering GROUP BY account_id", "consumed"),
        (
            "SELECT account_id, sum(amount_micro) FROM refunds WHERE status IN ('taken', 'confirmed') "
            "GROUP BY account_id",
            "refunded",
        ),
        ("SELECT account_id, sum(amount_micro) FROM forfeitures GROUP BY account_id", "forfeited"),
    ):
        for acct, total in store.query(sql):
            sums.setdefault(acct, dict.fromkeys(("consumed", "refunded", "forfeited"), 0))[name] = int(
                total or 0
            )
    rows_label = {"consumed": "metering charges", "refunded": "refund rows", "forfeited": "forfeiture rows"}
    for acct, by_name in sorted(sums.items()):
        found = snaps.get(acct)
        if found is None:
            problems.append(f"{history} {acct}: rows for an account that has no accounts row")
            continue
        for name, total in by_name.items():
            if found.counters[name] != total:
                problems.append(
                    f"{history} {acct}: {name} {found.counters[name]} != sum of {rows_label[name]} {total}"
                )
    # A reservation's draws must add up to what it holds.
    for req, held, draws in store.query(
        "SELECT request_id, held_micro, draws FROM reservations WHERE status = 'open'"
    ):
        drawn = sum(decode_draws(draws).values())
        if drawn != held:
            problems.append(f"{history} reservation {req}: draws {drawn} != held {held}")
    return problems


# ----- both sides -------------------------------------------------------------------------------


def history_name(store: Store) -> str:
    """How the problems name the history: its engine (an operator reconciling PostgreSQL at 3 a.m.
    should not read "sqlite")."""
    return "postgresql" if store.postgres else "sqlite"


def _compare(redis: dict[str, AccountSnapshot], sql: dict[str, AccountSnapshot], history: str) -> list[str]:
    problems: list[str] = []
    for acct in sorted(redis.keys() - sql.keys()):
        problems.append(f"{acct}: in redis, not in {history}")
    for acct in sorted(sql.keys() - redis.keys()):
        problems.append(f"{acct}: in {history}, not in redis")
    for acct in sorted(redis.keys() & sql.keys()):
        r, s = redis[acct], sql[acct]
        if r.status != s.status:
            problems.append(f"{acct}: status redis {r.status} != {history} {s.status}")
        if r.low_threshold != s.low_threshold:
            problems.append(f"{acct}: low_threshold redis {r.low_threshold} != {history} {s.low_threshold}")
        for name in COUNTERS:
            if r.counters[name] != s.counters[name]:
                problems.append(f"{acct}: {name} redis {r.counters[name]} != {history} {s.counters[name]}")
        for bid in sorted(r.buckets.keys() | s.buckets.keys()):
            rb, sb = r.buckets.get(bid), s.buckets.get(bid)
            if rb is None or sb is None:
                problems.append(f"{acct}: bucket {bid} only in {history if rb is None else 'redis'}")
            elif rb != sb:
                problems.append(
                    f"{acct}: bucket {bid} redis amount/remaining/expires {rb[0]}/{rb[1]}/{rb[2]}"
                    f" != {history} {sb[0]}/{sb[1]}/{sb[2]}"
                )
        if r.open_held != s.open_held:
            only_r = sorted(r.open_held.keys() - s.open_held.keys())
            only_s = sorted(s.open_held.keys() - r.open_held.keys())
            problems.append(
                f"{acct}: open reservations differ (redis only {only_r}, {history} only {only_s},"
                f" held redis {sum(r.open_held.values())} {history} {sum(s.open_held.values())})"
            )
        if r.live_keys != s.live_keys:
            problems.append(f"{acct}: live keys redis {sorted(r.live_keys)} != {history} {sorted(s.live_keys)}")
    return problems


async def drain_all(ledger: Ledger, store: Store, *, max_passes: int = 1000) -> int:
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    total = 0
    for _ in range(max_passes):
        n = await worker.drain_once()
        total += n
        if n == 0:
            break
    return total


async def reconcile(ledger: Ledger, store: Store, *, drain: bool = True, attempts: int = 3) -> Report:
    """Drain the journal, then check both sides and compare them. Traffic during the check can show
    a difference that the next drain removes, so a failing pass is retried; a real one persists."""
    problems: list[str] = []
    accounts = 0
    for attempt in range(max(1, attempts)):
        if drain:
            await drain_all(ledger, store)
        now = ledger.now_ms()
        redis_snap = await redis_snapshot(ledger)
        sql_snap = await asyncio.to_thread(sqlite_snapshot, store)
        problems = _redis_problems(redis_snap, now)
        problems += await asyncio.to_thread(functools.partial(check_sqlite, store, now_ms=now))
        problems += _compare(redis_snap, sql_snap, history_name(store))
        accounts = len(redis_snap.keys() | sql_snap.keys())
        if not problems or not drain or attempt == attempts - 1:
            break
        await asyncio.sleep(0.05 * (attempt + 1))
    return Report(ok=not problems, accounts=accounts, problems=problems)
