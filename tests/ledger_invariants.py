"""Conservation and bucket invariants of the live ledger, checked from Redis state read directly."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ledger.keys import shard_of
from ledger.ledger import Ledger

__all__ = ["AccountState", "account_state", "check_conservation", "scan_ledger"]


@dataclass(frozen=True, slots=True)
class AccountState:
    """One account's counters and the sums recomputed from its buckets and open reservations."""

    account_id: str
    status: str
    credited: int
    reserved: int
    consumed: int
    refunded: int
    forfeited: int
    bucket_amounts: int
    available: int  # remaining of unexpired buckets
    expired_unswept: int  # remaining of buckets past their expiry instant
    open_held: int  # sum of `held` over the account's open reservations
    problems: tuple[str, ...]


async def _open_reservations(ledger: Ledger, shard: int) -> dict[str, dict[str, str]]:
    """Every open reservation of a shard, found by SCAN (not through the ledger's own index)."""
    r = ledger.redis
    pfx = ledger.keys.shard_prefix(shard)
    out: dict[str, dict[str, str]] = {}
    async for key in r.scan_iter(match=pfx + "r:*", count=1000):
        out[key[len(pfx) + 2 :]] = await r.hgetall(key)
    return out


async def account_state(
    ledger: Ledger, account_id: str, reservations: dict[str, dict[str, str]] | None = None
) -> AccountState:
    r = ledger.redis
    pfx = ledger.keys.pfx_for(account_id)
    now = ledger.now_ms()
    problems: list[str] = []
    a = await r.hgetall(pfx + "a:" + account_id)
    if not a:
        return AccountState(account_id, "missing", 0, 0, 0, 0, 0, 0, 0, 0, 0, (f"{account_id}: no hash",))
    if reservations is None:
        reservations = await _open_reservations(ledger, shard_of(account_id))
    swept = set(await r.zrange(pfx + "bexp", 0, -1))
    amounts = available = expired_unswept = 0
    for bid in await r.zrange(pfx + "a:" + account_id + ":bz", 0, -1):
        b = await r.hgetall(pfx + "b:" + bid)
        if not b:
            problems.append(f"{account_id}: bucket {bid} indexed but missing")
            continue
        amount, remaining, expires = int(b["amount"]), int(b["remaining"]), int(b["expires_at"])
        if b["account"] != account_id:
            problems.append(f"{account_id}: bucket {bid} names account {b['account']}")
        if not 0 <= remaining <= amount:
            problems.append(f"{account_id}: bucket {bid} remaining {remaining} outside [0, {amount}]")
        amounts += amount
        if expires > now:
            available += remaining
        else:
            expired_unswept += remaining
            # The sweep zeroes a bucket and drops it from `bexp`; later give-backs forfeit at once.
            if bid not in swept and remaining != 0:
                problems.append(f"{account_id}: swept bucket {bid} holds {remaining}")
    if a["status"] == "closed" and available + expired_unswept != 0:
        problems.append(f"{account_id}: closed account still holds {available + expired_unswept}")
    open_held = 0
    for req, h in reservations.items():
        if h.get("account") != account_id:
            continue
        held = int(h["held"])
        drawn = sum(int(part.rpartition(":")[2]) for part in h["draws"].split(",") if part)
        if drawn != held:
            problems.append(f"{account_id}: reservation {req} holds {held} but drew {drawn}")
        open_held += held
    state = AccountState(
        account_id=account_id,
        status=a["status"],
        credited=int(a["credited"]),
        reserved=int(a["reserved"]),
        consumed=int(a["consumed"]),
        refunded=int(a["refunded"]),
        forfeited=int(a["forfeited"]),
        bucket_amounts=amounts,
        available=available,
        expired_unswept=expired_unswept,
        open_held=open_held,
        problems=(),
    )
    for name in ("credited", "reserved", "consumed", "refunded", "forfeited"):
        if getattr(state, name) < 0:
            problems.append(f"{account_id}: {name} is negative ({getattr(state, name)})")
    right = (
        state.available
        + state.reserved
        + state.consumed
        + state.refunded
        + state.forfeited
        + state.expired_unswept
    )
    if state.credited != right:
        problems.append(
            f"{account_id}: credited {state.credited} != available {state.available} + reserved "
            f"{state.reserved} + consumed {state.consumed} + refunded {state.refunded} + forfeited "
            f"{state.forfeited} + expired unswept {state.expired_unswept} (= {right})"
        )
    if amounts != state.credited:
        problems.append(f"{account_id}: bucket amounts {amounts} != credited {state.credited}")
    if open_held != state.reserved:
        problems.append(f"{account_id}: open reservations hold {open_held} != reserved {state.reserved}")
    return replace(state, problems=tuple(problems))


async def check_conservation(ledger: Ledger) -> list[str]:
    """Every violated invariant of every account of the ledger, as readable lines (empty: all hold).

    Per account: credited == available + reserved + consumed + refunded + forfeited + remaining of
    expired, not yet swept buckets; sum of bucket amounts == credited; reserved == sum of the open
    reservations' held; 0 <= remaining <= amount for each bucket. Every open reservation belongs to
    a known account and sits in its shard's deadline index.
    """
    r = ledger.redis
    problems: list[str] = []
    for shard in ledger.keys.all_shards():
        pfx = ledger.keys.shard_prefix(shard)
        reservations = await _open_reservations(ledger, shard)
        accounts = set(await r.smembers(pfx + "accounts"))
        deadlines = set(await r.zrange(pfx + "rz", 0, -1))
        for req, h in reservations.items():
            if h.get("account") not in accounts:
                problems.append(f"reservation {req} names unknown account {h.get('account')}")
            if req not in deadlines:
                problems.append(f"reservation {req} has no deadline (release_stale would never see it)")
        for account_id in sorted(accounts):
            state = await account_state(ledger, account_id, reservations)
            problems.extend(state.problems)
    return problems


async def scan_ledger(ledger: Ledger, *, skip_journal: bool = False) -> dict[str, str]:
    """Every key of the ledger's prefix with a flat text rendering of its value (for "appears nowhere")."""
    r = ledger.redis
    out: dict[str, str] = {}
    async for key in r.scan_iter(match=ledger.keys.pattern(), count=1000):
        kind = await r.type(key)
        if kind == "string":
            value = str(await r.get(key))
        elif kind == "hash":
            value = repr(sorted((await r.hgetall(key)).items()))
        elif kind == "set":
            value = repr(sorted(await r.smembers(key)))
        elif kind == "zset":
            value = repr(await r.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            if skip_journal:
                continue
            value = repr(await r.xrange(key))
        elif kind == "list":
            value = repr(await r.lrange(key, 0, -1))
        else:
            value = f"<{kind}>"
        out[key] = value
    return out
