"""Random operation sequences over three accounts keep the ledger conserved and equal to a Python model.

The model mirrors the contract (SPEC §4, §8): buckets drawn soonest-expiring first (ties: older id),
expired credit unusable from the expiry instant, surplus back to the buckets it came from, overrun from
the next ones, shortfall instead of a negative balance, give-backs into expired or closed buckets
forfeited at once. After every step: every bucket, counter and result equals the model's, and the
conservation checker finds nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import keys as K
from ledger.epoch import open_ledger
from ledger.errors import AccountClosed, InsufficientFunds, NotRefundable
from ledger.ledger import Ledger
from tests.conftest import REDIS_URL, no_history
from tests.ledger_invariants import check_conservation

settings.register_profile(
    "ledger-fakeredis",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A real Redis round trip per call: fewer examples, same operations.
settings.register_profile("ledger-redis", parent=settings.get_profile("ledger-fakeredis"), max_examples=40)

LIVES_S = (10, 60, 300, 30 * 24 * 3600)
RESERVATION_TTL_S = 60


class TickClock:
    """Whole milliseconds, one tick per operation: bucket ids (time first) then sort the same on every
    run, so a failing sequence replays exactly (ties at one millisecond would fall to random hex)."""

    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000  # int(t * 1000) in the ledger gives back exactly self.ms

    def advance_ms(self, ms: int) -> None:
        self.ms += ms


# ----- the model --------------------------------------------------------------------------------


@dataclass
class MBucket:
    bid: str
    account: str
    amount: int
    remaining: int
    expires_at: int
    swept: bool = False


@dataclass
class MAccount:
    status: str = "active"
    credited: int = 0
    reserved: int = 0
    consumed: int = 0
    refunded: int = 0
    forfeited: int = 0
    refs: list[str] = field(default_factory=list)


@dataclass
class MReservation:
    account: str
    held: int
    draws: list[list[Any]]  # [bucket_id, amount], in draw order
    deadline: int


@dataclass
class Model:
    accounts: dict[str, MAccount] = field(default_factory=dict)
    buckets: dict[str, MBucket] = field(default_factory=dict)
    open: dict[str, MReservation] = field(default_factory=dict)
    settled: dict[str, tuple[int, int, list[tuple[str, int]]]] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    refunds: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> status, bucket, amount

    def usable(self, acct: str, now: int) -> list[MBucket]:
        bs = [b for b in self.buckets.values() if b.account == acct and b.expires_at > now]
        return sorted(bs, key=lambda b: (b.expires_at, b.bid))

    def available(self, acct: str, now: int) -> int:
        return sum(b.remaining for b in self.usable(acct, now))

    def draw(self, acct: str, want: int, now: int) -> tuple[int, list[list[Any]]]:
        taken, draws = 0, []
        for b in self.usable(acct, now):
            if taken >= want:
                break
            x = min(b.remaining, want - taken)
            if x > 0:
                b.remaining -= x
                taken += x
                draws.append([b.bid, x])
        return taken, draws

    def give_back(self, bid: str, x: int, now: int) -> None:
        b = self.buckets[bid]
        a = self.accounts[b.account]
        if b.expires_at <= now or a.status == "closed":
            a.forfeited += x
        else:
            b.remaining += x

    def release(self, req: str, now: int) -> int:
        r = self.open.pop(req, None)
        if r is None:
            return 0
        for bid, x in reversed(r.draws):
            self.give_back(bid, x, now)
        self.accounts[r.account].reserved -= r.held
        self.released.add(req)
        return r.held

    def settle(self, acct: str, req: str, charge: int, now: int) -> tuple[int, int, list[tuple[str, int]]]:
        r = self.open.pop(req, None)
        held, draws = (r.held, r.draws) if r else (0, [])
        shortfall = 0
        if charge <= held:
            surplus = held - charge
            for d in reversed(draws):
                if surplus <= 0:
                    break
                x = min(surplus, d[1])
                self.give_back(d[0], x, now)
                d[1] -= x
                surplus -= x
        else:
            taken, extra = self.draw(acct, charge - held, now)
            for bid, x in extra:
                for d in draws:
                    if d[0] == bid:
                        d[1] += x
                        break
                else:
                    draws.append([bid, x])
            shortfall = charge - held - taken
        a = self.accounts[acct]
        a.reserved -= held
        a.consumed += charge - shortfall
        result = (charge - shortfall, shortfall, [(bid, x) for bid, x in draws if x > 0])
        self.settled[req] = result
        self.released.discard(req)
        return result


# ----- operations -------------------------------------------------------------------------------

acct_i = st.integers(0, 2)
amount = st.integers(0, 400)
# Expiry on a 10 s grid, so buckets credited close together tie and fall to the older one.
credit = st.tuples(st.just("credit"), acct_i, st.integers(1, 200), st.sampled_from(LIVES_S), st.booleans())
reserve = st.tuples(st.just("reserve"), acct_i, amount, st.booleans(), st.integers(0, 100))
# Charge below, equal to or above what was held; open_only picks among open reservations.
settle = st.tuples(
    st.just("settle"), st.integers(0, 50), st.booleans(), st.sampled_from(("below", "equal", "above")), amount
)
# Each kind with its weight (how many times it is listed): spending is what the ledger mostly does.
KINDS = {
    "credit": (2, credit),
    "reserve": (4, reserve),
    "settle": (4, settle),
    "release": (1, st.tuples(st.just("release"), st.integers(0, 50), st.booleans())),
    "refund": (1, st.tuples(st.just("refund"), acct_i, st.integers(0, 20), st.integers(0, 300))),
    "finish": (1, st.tuples(st.just("finish"), st.integers(0, 20), st.booleans())),
    "expire": (1, st.tuples(st.just("expire"))),
    "advance": (1, st.tuples(st.just("advance"), st.sampled_from((1, 5, 10, 30, 61, 301)))),
    # To a bucket's expiry instant (or a millisecond either side): the boundary SPEC §4 names.
    "to_expiry": (1, st.tuples(st.just("to_expiry"), st.integers(0, 20), st.sampled_from((-1, 0, 0, 1)))),
    "stale": (1, st.tuples(st.just("stale"))),
    "close": (1, st.just(("close",))),
}
operation = st.sampled_from([k for k, (w, _) in KINDS.items() for _ in range(w)]).flatmap(
    lambda kind: KINDS[kind][1]
)
# Every sequence opens with a few credits, so there is something to spend from the first step.
operations = st.builds(
    lambda first, rest: first + rest,
    st.lists(credit, min_size=2, max_size=6),
    st.lists(operation, min_size=10, max_size=50),
)


def _pick(model: Model, reqs: list[str], j: int, open_only: bool) -> str:
    pool = sorted(model.open, key=reqs.index) if open_only and model.open else reqs
    return pool[j % len(pool)]


async def _apply(
    ledger: Ledger, clock: TickClock, model: Model, accts: list[str], reqs: list[str], op: tuple[Any, ...]
) -> None:
    kind = op[0]
    now = ledger.now_ms()
    if kind == "credit":
        _, i, amt, life, reuse = op
        acct, m = accts[i], model.accounts[accts[i]]
        ref = m.refs[amt % len(m.refs)] if reuse and m.refs else f"ref-{uuid.uuid4().hex[:12]}"
        expires = (now // 10_000 + 1) * 10_000 + life * 1000
        if m.status == "closed" and ref not in m.refs:
            with pytest.raises(AccountClosed):
                await ledger.credit(acct, amt, reference=ref, source="grant", expires_at_ms=expires)
            return
        c = await ledger.credit(acct, amt, reference=ref, source="grant", expires_at_ms=expires)
        if ref in m.refs:  # a retry answers with the first bucket, even after closure
            assert not c.created and c.bucket_id in model.buckets
            return
        assert c.created
        m.refs.append(ref)
        m.credited += amt
        model.buckets[c.bucket_id] = MBucket(c.bucket_id, acct, amt, amt, expires)
    elif kind == "reserve":
        _, i, amt, partial, min_pct = op
        acct, m = accts[i], model.accounts[accts[i]]
        minimum = amt * min_pct // 100 if partial else amt
        rid = K.new_request_id(K.shard_of(acct))
        reqs.append(rid)
        if m.status == "closed":
            with pytest.raises(AccountClosed):
                await ledger.reserve(acct, rid, amt, min_micro=minimum, ttl_s=RESERVATION_TTL_S)
            return
        avail = model.available(acct, now)
        if avail < minimum:
            with pytest.raises(InsufficientFunds) as err:
                await ledger.reserve(acct, rid, amt, min_micro=minimum, ttl_s=RESERVATION_TTL_S)
            assert err.value.available_micro == avail
            return
        held = await ledger.reserve(acct, rid, amt, min_micro=minimum, ttl_s=RESERVATION_TTL_S)
        taken, draws = model.draw(acct, min(amt, avail), now)
        assert held == taken
        m.reserved += taken
        model.open[rid] = MReservation(acct, taken, draws, now + RESERVATION_TTL_S * 1000)
    elif kind == "settle":
        _, j, open_only, mode, delta = op
        if not reqs:
            return
        rid = _pick(model, reqs, j, open_only)
        acct = _account_of(model, accts, rid)
        held = model.open[rid].held if rid in model.open else 0
        charge = {"below": max(held - delta, 0), "equal": held, "above": held + delta}[mode]
        s = await ledger.settle(acct, rid, charge, metering={"model": "m", "in": delta})
        if rid in model.settled:
            assert s.already
            assert (s.charged_micro, s.shortfall_micro, s.draws) == model.settled[rid]
            return
        assert not s.already
        assert (s.charged_micro, s.shortfall_micro, s.draws) == model.settle(acct, rid, charge, now)
    elif kind == "release":
        if not reqs:
            return
        rid = _pick(model, reqs, op[1], op[2])
        acct = _account_of(model, accts, rid)
        assert await ledger.release(acct, rid) == model.release(rid, now)
    elif kind == "refund":
        _, i, b_i, amt = op
        acct = accts[i]
        mine = sorted(bid for bid, b in model.buckets.items() if b.account == acct)
        if not mine:
            return
        bid = mine[b_i % len(mine)]
        b = model.buckets[bid]
        rfd = f"rfd_{len(model.refunds) + len(reqs):06d}_{i}_{b_i}"
        want = b.remaining if amt == 0 else amt
        if b.expires_at <= now or want <= 0 or want > b.remaining:
            with pytest.raises(NotRefundable):
                await ledger.refund(acct, bid, refund_id=rfd, amount_micro=amt)
            return
        assert await ledger.refund(acct, bid, refund_id=rfd, amount_micro=amt) == want
        assert await ledger.refund(acct, bid, refund_id=rfd, amount_micro=amt) == want  # idempotent
        b.remaining -= want
        model.accounts[acct].refunded += want
        model.refunds[rfd] = ("taken", bid, want)
    elif kind == "finish":
        _, j, ok = op
        if not model.refunds:
            return
        rfd = sorted(model.refunds)[j % len(model.refunds)]
        status, bid, amt = model.refunds[rfd]
        acct = model.buckets[bid].account
        assert await ledger.finish_refund(acct, rfd, ok=ok) == (status == "taken")
        if status == "taken":
            model.refunds[rfd] = ("confirmed" if ok else "reverted", bid, amt)
            if not ok:
                model.accounts[acct].refunded -= amt
                model.give_back(bid, amt, now)
    elif kind == "expire":
        due = [b for b in model.buckets.values() if not b.swept and b.expires_at <= now]
        total = sum(b.remaining for b in due)
        assert await ledger.expire() == (len(due), total)
        for b in due:
            model.accounts[b.account].forfeited += b.remaining
            b.remaining, b.swept = 0, True
    elif kind == "advance":
        clock.advance_ms(op[1] * 1000)
    elif kind == "to_expiry":
        ahead = sorted({b.expires_at + op[2] for b in model.buckets.values()} - {now})
        ahead = [t for t in ahead if t > now]
        if ahead:
            clock.advance_ms(ahead[op[1] % len(ahead)] - now)
    elif kind == "stale":
        stale = [rid for rid, r in model.open.items() if r.deadline <= now]
        assert await ledger.release_stale() == len(stale)
        for rid in stale:
            model.release(rid, now)
    elif kind == "close":
        # At most one account closes, preferably one with requests in flight (their settle or
        # release then gives credit back to a closed account, which must forfeit it).
        closed = [a for a in accts if model.accounts[a].status == "closed"]
        busy = [r.account for r in model.open.values()]
        acct = closed[0] if closed else (busy[0] if busy else accts[0])
        m = model.accounts[acct]
        if m.status == "closed":
            with pytest.raises(AccountClosed):
                await ledger.close_account(acct)
            return
        its = [b for b in model.buckets.values() if b.account == acct]
        left = sum(b.remaining for b in its)
        assert await ledger.close_account(acct) == (left, 0)
        for b in its:
            b.remaining, b.swept = 0, True
        m.forfeited += left
        m.status = "closed"


def _account_of(model: Model, accts: list[str], rid: str) -> str:
    if rid in model.open:
        return model.open[rid].account
    # Finished or refused requests: the shard in the id says which account (one per shard here).
    return next(a for a in accts if K.shard_of(a) == K.shard_of(rid))


async def _check(ledger: Ledger, model: Model, accts: list[str]) -> None:
    assert await check_conservation(ledger) == []
    now = ledger.now_ms()
    for acct in accts:
        m = model.accounts[acct]
        info = await ledger.account(acct)
        assert info is not None
        assert (info.status, info.credited, info.reserved, info.consumed, info.refunded, info.forfeited) == (
            m.status,
            m.credited,
            m.reserved,
            m.consumed,
            m.refunded,
            m.forfeited,
        )
        bal = await ledger.balance(acct)
        assert bal.available_micro == model.available(acct, now) >= 0
        assert {b.bucket_id: b.remaining_micro for b in bal.buckets} == {
            bid: b.remaining for bid, b in model.buckets.items() if b.account == acct
        }


async def run_operations(redis: aioredis.Redis, ops: list[tuple[Any, ...]]) -> None:
    # One shard per account: a request id's shard finds its account even after it finished.
    keyspace = K.Keyspace(prefix=f"p{uuid.uuid4().hex[:10]}", shards=3)
    clock = TickClock()
    ledger = Ledger(redis, keyspace, clock=clock)
    await open_ledger(ledger, no_history)
    model = Model()
    accts = []
    try:
        for shard in range(3):
            # A Google sub places its account in the sub's shard: pick one sub per shard.
            sub = next(s for n in range(1000) if K.shard_for_subject(s := f"sub-{n}", 3) == shard)
            acct, created = await ledger.create_account(f"u{shard}@example.com", sub=sub)
            assert created and K.shard_of(acct) == shard
            accts.append(acct)
            model.accounts[acct] = MAccount()
        reqs: list[str] = []
        for op in ops:
            await _apply(ledger, clock, model, accts, reqs, op)
            await _check(ledger, model, accts)
            clock.advance_ms(1)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{keyspace.prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)


@settings(settings.get_profile("ledger-fakeredis"))
@given(ops=operations)
async def test_random_operations_conserve_credit_on_fakeredis(ops: list[tuple[Any, ...]]) -> None:
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    try:
        await run_operations(redis, ops)
    finally:
        await redis.aclose()


@settings(settings.get_profile("ledger-redis"))
@given(ops=operations)
async def test_random_operations_conserve_credit_on_real_redis(ops: list[tuple[Any, ...]]) -> None:
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await run_operations(redis, ops)
    finally:
        await redis.aclose()


@given(st.integers(min_value=0, max_value=253402300799999))
def test_iso_ms_is_the_iso_8601_utc_millisecond_stamp(ms: int) -> None:
    import datetime as dt

    from ledger.money import iso_ms

    at = dt.datetime.fromtimestamp(ms // 1000, tz=dt.UTC).replace(microsecond=(ms % 1000) * 1000)
    assert iso_ms(ms) == at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
