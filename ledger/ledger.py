"""The live ledger's Python face: every balance change is one Lua call; reads are plain Redis reads.

Operations are idempotent on an id the caller chooses (a request id, a top-up's charge id, a refund
id), so a retry after a timeout answers "exists" and never moves money twice.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from . import keys as K
from .errors import (
    AccountClosed,
    ConcurrencyLimit,
    InsufficientFunds,
    KeyLimit,
    LedgerError,
    LedgerLost,
    NotRefundable,
    UnknownAccount,
    UnknownBucket,
    UnknownKey,
)
from .money import MAX_MICRO
from .personal import new_account_key, seal
from .records import (
    TOPUP_STATUSES,
    AccountInfo,
    Balance,
    BucketInfo,
    Credit,
    KeyInfo,
    KeyRef,
    NewKey,
    Settlement,
    Topup,
    bucket_of,
    decode_draws,
    topup_of,
)
from .redis_client import AnyRedis
from .scripts import Scripts

__all__ = [
    "DEFAULT_BUCKET_LIFE_S",
    "MAX_LIVE_KEYS",
    "AccountInfo",
    "Balance",
    "BucketInfo",
    "Credit",
    "KeyInfo",
    "KeyRef",
    "Ledger",
    "NewKey",
    "Settlement",
    "Topup",
]

DEFAULT_BUCKET_LIFE_S = 30 * 24 * 3600
MAX_LIVE_KEYS = 2
RESERVATION_TTL_S = 300
DONE_TTL_S = 7 * 24 * 3600


def _check_amount(micro: int, name: str = "amount") -> None:
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 0 or micro > MAX_MICRO:
        raise ValueError(f"{name} must be an integer number of micro-units in [0, 2**50]")


class Ledger:
    def __init__(
        self,
        redis: AnyRedis,
        keyspace: K.Keyspace | None = None,
        *,
        clock: Callable[[], float] = time.time,
        done_ttl_s: int = DONE_TTL_S,
        script_lane: bool = False,
    ) -> None:
        # Any: the client decodes responses to str, which redis-py's annotations cannot express.
        self.redis: Any = redis
        self.keys = keyspace or K.Keyspace()
        self.clock = clock
        # How long a finished request's outcome (rd:*) answers a retried settle or reserve.
        self.done_ttl_s = done_ttl_s
        # script_lane: the scripts go down one pipelined connection first (ledger/scriptlane.py), for
        # the web process's request path; then aclose() must be called.
        self._scripts = Scripts(redis, lane=script_lane)

    async def aclose(self) -> None:
        """Close what the ledger opened itself (the script lane); the Redis client is the caller's."""
        await self._scripts.aclose()

    async def load_scripts(self) -> None:
        await self._scripts.load()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _run(self, name: str, ident: str, *args: str | int) -> list[Any]:
        return await self._run_shard(name, K.shard_of(ident), *args)

    async def _run_shard(self, name: str, shard: int, *args: str | int) -> list[Any]:
        result: list[Any] = await self._scripts(name, self.keys.journal(shard), *args)
        if result and result[0] == "no_ledger":
            raise LedgerLost()
        return result

    async def _confirm_absent(self, pfx: str) -> None:
        """A read found nothing: make sure that is an answer and not a Redis that lost its data (which
        would turn every key into 'invalid' and every account into 'unknown'). Only on the miss path."""
        if not await self.redis.exists(pfx + "epoch"):
            raise LedgerLost()

    # ----- accounts -------------------------------------------------------------------------
    async def create_account(
        self,
        email: str,
        *,
        sub: str | None = None,
        low_threshold_micro: int = 0,
        reference: str | None = None,
    ) -> tuple[str, bool]:
        """Returns (account_id, created). With a Google sub the same sub always finds the same account;
        with an operator's idempotency reference the same reference does."""
        if sub:
            shard = K.shard_for_subject(sub, self.keys.shards)
            sub_hash = K.hash_subject(sub)
            account_id = K.new_account_id(shard)
        elif reference:
            sub_hash = ""
            account_id = K.account_id_for_reference(reference, self.keys.shards)
        else:
            shard = int.from_bytes(secrets.token_bytes(2), "big") % self.keys.shards
            sub_hash = ""
            account_id = K.new_account_id(shard)
        pii_key = new_account_key()
        res = await self._run(
            "account_create", account_id, account_id, email, sub_hash, self.now_ms(), low_threshold_micro,
            pii_key, seal(pii_key, account_id, "email", email), seal(pii_key, account_id, "sub", sub or ""),
        )
        return res[1], res[0] == "ok"

    async def find_account_by_sub(self, sub: str) -> str | None:
        shard = K.shard_for_subject(sub, self.keys.shards)
        pfx = self.keys.shard_prefix(shard)
        got: str | None = await self.redis.get(pfx + "sub:" + K.hash_subject(sub))
        if got is None:
            await self._confirm_absent(pfx)
        return got

    async def account(self, account_id: str) -> AccountInfo | None:
        try:
            pfx = self.keys.pfx_for(account_id)
        except ValueError:
            return None
        h = await self.redis.hgetall(pfx + "a:" + account_id)
        if not h.get("status"):
            if not h:
                await self._confirm_absent(pfx)  # nothing at all: a lost ledger, or no such account
            # A fragment without the record (a stray field written by hand): no account.
            return None

        def n(name: str) -> int:
            v = h.get(name) or "0"
            return int(v) if v.lstrip("-").isdigit() else 0

        return AccountInfo(
            account_id=account_id,
            status=h["status"],
            email=h.get("email"),
            created_at=n("created_at"),
            credited=n("credited"),
            reserved=n("reserved"),
            consumed=n("consumed"),
            refunded=n("refunded"),
            forfeited=n("forfeited"),
            low_threshold_micro=n("low_threshold"),
        )

    async def close_account(self, account_id: str) -> tuple[int, int]:
        """Returns (forfeited_micro, keys_revoked)."""
        res = await self._run("account_close", account_id, account_id, self.now_ms())
        if res[0] == "no_account":
            raise UnknownAccount("no such account")
        if res[0] == "closed":
            raise AccountClosed("account is already closed")
        return int(res[1]), int(res[2])

    async def set_low_threshold(self, account_id: str, micro: int) -> None:
        _check_amount(micro, "threshold")
        res = await self._run(
            "account_set", account_id, account_id, self.now_ms(), "low_threshold", micro, "", ""
        )
        if res[0] != "ok":
            raise UnknownAccount("no such active account")

    async def set_email(self, account_id: str, email: str) -> None:
        pfx = self.keys.pfx_for(account_id)
        for _ in range(3):
            # Sealed with the account's own key; an account older than pii_key gets a new one.
            pii_key = await self.redis.hget(pfx + "a:" + account_id, "pii_key") or new_account_key()
            sealed = seal(pii_key, account_id, "email", email)
            res = await self._run(
                "account_set", account_id, account_id, self.now_ms(), "email", email, sealed, pii_key
            )
            if res[0] != "stale_key":  # another writer gave the account its key meanwhile: again
                break
        if res[0] != "ok":
            raise UnknownAccount("no such active account")

    async def account_ids(self) -> list[str]:
        ids: list[str] = []
        for shard in self.keys.all_shards():
            ids.extend(await self.redis.smembers(self.keys.shard_prefix(shard) + "accounts"))
        return sorted(ids)

    # ----- API keys -------------------------------------------------------------------------
    async def create_key(
        self, account_id: str, *, replaces: str | None = None, reference: str | None = None
    ) -> NewKey:
        """A new key; with an operator's idempotency reference, a retry answers the first key's id
        (created=False, no key: it was shown once, when it was made)."""
        shard = K.shard_of(account_id)
        key = K.new_api_key(shard)
        key_id = K.key_id_for_reference(account_id, reference) if reference else K.new_key_id(shard)
        prefix = key[:12]
        res = await self._run(
            "key_create", account_id, account_id, key_id, K.hash_api_key(key), prefix, self.now_ms(),
            MAX_LIVE_KEYS, replaces or "",
        )
        if res[0] == "exists":
            return NewKey(key_id=key_id, key="", prefix=str(res[1]), created=False)
        if res[0] == "limit":
            raise KeyLimit(f"an account has at most {MAX_LIVE_KEYS} live API keys; revoke or renew one")
        if res[0] == "no_account":
            raise UnknownAccount("no such active account")
        if res[0] == "unknown_key":
            raise UnknownKey("no such live key")
        return NewKey(key_id=key_id, key=key, prefix=prefix)

    async def rotate_key(self, key_id: str) -> NewKey:
        account_id = await self.key_account(key_id)
        if account_id is None:
            raise UnknownKey("no such live key")
        return await self.create_key(account_id, replaces=key_id)

    async def revoke_key(self, key_id: str) -> str:
        res = await self._run("key_revoke", key_id, key_id, self.now_ms())
        if res[0] != "ok":
            raise UnknownKey("no such live key")
        account: str = res[1]
        return account

    async def key_account(self, key_id: str) -> str | None:
        try:
            pfx = self.keys.pfx_for(key_id)
        except ValueError:
            return None
        got = await self.redis.hmget(pfx + "k:" + key_id, "account", "hash")
        return got[0] if got[1] else None

    async def lookup_key(self, key: str) -> KeyRef | None:
        """One round trip: the key's hash resolves to its account, or to nothing once revoked."""
        try:
            pfx = self.keys.pfx_for(key)
        except ValueError:
            return None
        got = await self.redis.hmget(pfx + "kh:" + K.hash_api_key(key), "account", "key_id")
        if got[0] is None:
            await self._confirm_absent(pfx)  # a lost ledger is 503 "being restored", never 401
            return None
        return KeyRef(account_id=got[0], key_id=got[1])

    async def list_keys(self, account_id: str) -> list[KeyInfo]:
        pfx = self.keys.pfx_for(account_id)
        key_ids = await self.redis.hkeys(pfx + "a:" + account_id + ":keys")
        out = []
        for key_id in sorted(key_ids):
            h = await self.redis.hgetall(pfx + "k:" + key_id)
            if h:
                out.append(
                    KeyInfo(
                        key_id=key_id,
                        prefix=h["prefix"],
                        created_at=int(h["created_at"]),
                        last_used_at=int(h["last_used_at"]) if h.get("last_used_at") else None,
                    )
                )
        return sorted(out, key=lambda k: k.created_at)

    # ----- money ----------------------------------------------------------------------------
    async def credit(
        self,
        account_id: str,
        amount_micro: int,
        *,
        reference: str,
        source: str,
        expires_at_ms: int | None = None,
        life_s: int = DEFAULT_BUCKET_LIFE_S,
    ) -> Credit:
        _check_amount(amount_micro)
        if amount_micro <= 0:
            raise ValueError("credit must be positive")
        now = self.now_ms()
        expires = expires_at_ms if expires_at_ms is not None else now + life_s * 1000
        bucket_id = K.new_bucket_id(K.shard_of(account_id), now)
        res = await self._run(
            "credit", account_id, account_id, bucket_id, reference, amount_micro, expires, source, now
        )
        if res[0] == "no_account":
            raise UnknownAccount("no such account")
        if res[0] == "closed":
            raise AccountClosed("the account is closed")
        if res[0] == "exists":
            b = await self.bucket(res[1])
            assert b is not None, "a credited reference always names its bucket"
            return Credit(res[1], b.amount_micro, b.expires_at, created=False)
        return Credit(bucket_id, amount_micro, expires, created=True)

    async def reserve(
        self,
        account_id: str,
        request_id: str,
        amount_micro: int,
        *,
        key_id: str = "",
        min_micro: int | None = None,
        concurrency_limit: int = 0,
        ttl_s: int = RESERVATION_TTL_S,
        key_hash: str = "",
    ) -> int:
        """Hold credit; returns the amount held. With min_micro below the amount, holds what is there.
        With key_hash, refuses (UnknownKey) unless that key is still live, atomically."""
        _check_amount(amount_micro)
        minimum = amount_micro if min_micro is None else min(min_micro, amount_micro)
        now = self.now_ms()
        res = await self._run(
            "reserve", account_id, request_id, account_id, key_id, amount_micro, minimum, now,
            now + ttl_s * 1000, concurrency_limit, key_hash,
        )
        tag = res[0]
        if tag in ("ok", "exists"):
            return int(res[1])
        if tag == "short":
            raise InsufficientFunds("not enough credit", available_micro=int(res[1]))
        if tag == "busy":
            raise ConcurrencyLimit("too many requests in flight for this key")
        if tag == "closed":
            raise AccountClosed("the account is closed")
        if tag == "no_account":
            raise UnknownAccount("no such account")
        if tag == "revoked":
            raise UnknownKey("the API key was revoked")
        raise LedgerError(f"reservation {request_id} already finished")

    async def settle(
        self, account_id: str, request_id: str, charge_micro: int, *, metering: dict[str, Any]
    ) -> Settlement:
        """Charge the request; `metering` holds ids and counts only (it becomes the metering row)."""
        _check_amount(charge_micro, "charge")
        journal, args = self._settle_args(account_id, request_id, charge_micro, metering)
        return self.settlement_of(await self._scripts("settle", journal, *args))

    def settle_started(
        self, account_id: str, request_id: str, charge_micro: int, *, metering: dict[str, Any]
    ) -> asyncio.Future[Any] | None:
        """``settle`` sent without waiting, where the script lane is connected: a future of the
        script's reply, for ``settlement_of``; it fails with ``LaneUnavailable`` when the lane could
        not answer (then ``settle``, idempotent on the request id). None: call ``settle``."""
        _check_amount(charge_micro, "charge")
        journal, args = self._settle_args(account_id, request_id, charge_micro, metering)
        return self._scripts.start("settle", journal, *args)

    def _settle_args(
        self, account_id: str, request_id: str, charge_micro: int, metering: dict[str, Any]
    ) -> tuple[str, tuple[str | int, ...]]:
        """The settle script's journal key and arguments."""
        args = (request_id, account_id, charge_micro, self.now_ms(), orjson.dumps(metering).decode(), self.done_ttl_s)
        return self.keys.journal(K.shard_of(account_id)), args

    @staticmethod
    def settlement_of(res: list[Any]) -> Settlement:
        """The settle script's reply as a Settlement (LedgerLost: Redis lost the ledger)."""
        if res and res[0] == "no_ledger":
            raise LedgerLost()
        return Settlement(
            charged_micro=int(res[1]),
            shortfall_micro=int(res[2]),
            draws=decode_draws(res[3]),
            already=res[0] == "exists",
        )

    async def release(self, account_id: str, request_id: str, *, reason: str = "released") -> int:
        res = await self._run(
            "release", account_id, request_id, account_id, self.now_ms(), reason, self.done_ttl_s
        )
        return int(res[1]) if res[0] == "ok" else 0

    async def refund(
        self, account_id: str, bucket_id: str, *, refund_id: str, amount_micro: int = 0
    ) -> int:
        """Take unused credit out of a bucket (0 = all of it); returns the amount taken."""
        _check_amount(amount_micro)
        res = await self._run(
            "refund", account_id, refund_id, account_id, bucket_id, amount_micro, self.now_ms()
        )
        tag = res[0]
        if tag == "ok":
            return int(res[1])
        if tag == "exists":
            if res[1] == "reverted":
                raise NotRefundable("this refund was refused earlier")
            return int(res[2])
        if tag == "no_bucket":
            raise UnknownBucket("no such bucket on this account")
        if tag == "expired":
            raise NotRefundable("the bucket has expired; expired credit is not refundable")
        raise NotRefundable("nothing left to refund in this bucket", remaining_micro=int(res[1]))

    async def finish_refund(
        self, account_id: str, refund_id: str, *, ok: bool, external_ref: str = ""
    ) -> bool:
        """Confirm a refund paid out, or put the credit back when the provider refused it."""
        res = await self._run(
            "refund_finish", account_id, refund_id, self.now_ms(), "confirmed" if ok else "reverted",
            external_ref,
        )
        return bool(res[0] == "ok")

    async def expire(self, *, limit: int = 1000) -> tuple[int, int]:
        """Forfeit expired credit in every shard; returns (buckets visited, forfeited micro)."""
        buckets = total = 0
        now = self.now_ms()
        for shard in self.keys.all_shards():
            while True:
                res = await self._run_shard("expire", shard, now, limit)
                buckets += int(res[0])
                total += int(res[1])
                if int(res[0]) < limit:
                    break
        return buckets, total

    async def stale_reservations(self, shard: int, *, limit: int = 500) -> list[tuple[str, str]]:
        pfx = self.keys.shard_prefix(shard)
        reqs = await self.redis.zrangebyscore(pfx + "rz", "-inf", self.now_ms(), start=0, num=limit)
        out = []
        for req in reqs:
            account = await self.redis.hget(pfx + "r:" + req, "account")
            if account:
                out.append((account, req))
            else:
                await self.redis.zrem(pfx + "rz", req)
        return out

    async def release_stale(self) -> int:
        """Release reservations whose process stopped extending them (it died)."""
        n = 0
        for shard in self.keys.all_shards():
            for account, req in await self.stale_reservations(shard):
                # Count by outcome, not by amount: a partial reservation may hold 0.
                res = await self._run(
                    "release", account, req, account, self.now_ms(), "abandoned", self.done_ttl_s
                )
                if res[0] == "ok":
                    n += 1
        return n

    async def extend(self, reservations: Iterable[tuple[str, str]], ttl_s: int = RESERVATION_TTL_S) -> None:
        """Heartbeat for long streams: push the deadline of live reservations (XX: never resurrect)."""
        deadline = self.now_ms() + ttl_s * 1000
        # One ZADD per shard (one hash slot each: a cluster refuses a multi-slot batch).
        by_shard: dict[str, list[str]] = {}
        for account_id, req in reservations:
            by_shard.setdefault(self.keys.pfx_for(account_id), []).append(req)
        for pfx, reqs in by_shard.items():
            await self.redis.zadd(pfx + "rz", dict.fromkeys(reqs, deadline), xx=True)

    # ----- top-ups --------------------------------------------------------------------------
    async def create_topup(
        self, account_id: str, amount_micro: int, *, amount_minor: int, currency: str, method: str
    ) -> Topup:
        """A pending top-up in the account's shard (its id carries the shard), before Omise is asked."""
        _check_amount(amount_micro)
        if amount_micro <= 0 or amount_minor <= 0:
            raise ValueError("a top-up must be positive")
        now = self.now_ms()
        topup_id = f"top_{K.shard_of(account_id):02x}{now:013d}{secrets.token_hex(5)}"
        res = await self._run(
            "topup", account_id, "create", topup_id, now, account_id, amount_micro, amount_minor,
            currency.lower(), method,
        )
        if res[0] == "no_account":
            raise UnknownAccount("no such account")
        if res[0] == "closed":
            raise AccountClosed("the account is closed")
        topup = await self.topup(topup_id)
        assert topup is not None, "a created top-up is readable"
        return topup

    async def update_topup(
        self,
        topup_id: str,
        status: str,
        *,
        charge_id: str = "",
        failure_code: str = "",
        failure_message: str = "",
        bucket_id: str = "",
    ) -> tuple[str, str]:
        """Move a top-up forward (see lua/topup.lua). Returns (outcome, status or stored charge id):
        outcome 'ok' (changed), 'same', 'unknown' or 'mismatch' (tied to another charge)."""
        if status not in TOPUP_STATUSES:
            raise ValueError("unknown top-up status")
        res = await self._run(
            "topup", topup_id, "update", topup_id, self.now_ms(), status, charge_id, failure_code[:64],
            failure_message[:255], bucket_id,
        )
        return str(res[0]), str(res[1]) if len(res) > 1 else ""

    async def topup(self, topup_id: str) -> Topup | None:
        try:
            pfx = self.keys.pfx_for(topup_id)
        except ValueError:
            return None
        if not topup_id.startswith("top_"):
            return None
        h = await self.redis.hgetall(pfx + "t:" + topup_id)
        return topup_of(topup_id, h) if h else None

    async def topups(self, account_id: str, *, limit: int = 50) -> list[Topup]:
        """The account's top-ups, newest first."""
        pfx = self.keys.pfx_for(account_id)
        ids = await self.redis.zrevrange(pfx + "a:" + account_id + ":tops", 0, max(0, limit - 1))
        return [t for t in [await self.topup(tid) for tid in ids] if t is not None]

    async def pending_topups(self, *, older_than_ms: int = 0, limit: int = 500) -> list[Topup]:
        """Pending top-ups created at least `older_than_ms` ago, oldest first, every shard."""
        cutoff = self.now_ms() - older_than_ms
        out: list[Topup] = []
        for shard in self.keys.all_shards():
            pfx = self.keys.shard_prefix(shard)
            ids = await self.redis.zrangebyscore(pfx + "tp", "-inf", cutoff, start=0, num=limit)
            for tid in ids:
                t = await self.topup(tid)
                if t is not None:
                    out.append(t)
        return sorted(out, key=lambda t: t.created_at)[:limit]

    # ----- reads ----------------------------------------------------------------------------
    async def bucket(self, bucket_id: str) -> BucketInfo | None:
        try:
            pfx = self.keys.pfx_for(bucket_id)
        except ValueError:
            return None
        h = await self.redis.hgetall(pfx + "b:" + bucket_id)
        return bucket_of(bucket_id, h) if h else None

    async def bucket_account(self, bucket_id: str) -> str | None:
        try:
            pfx = self.keys.pfx_for(bucket_id)
        except ValueError:
            return None
        got: str | None = await self.redis.hget(pfx + "b:" + bucket_id, "account")
        return got

    async def buckets(self, account_id: str) -> list[BucketInfo]:
        pfx = self.keys.pfx_for(account_id)
        ids = await self.redis.zrange(pfx + "a:" + account_id + ":bz", 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for bid in ids:
            pipe.hgetall(pfx + "b:" + bid)
        rows = await pipe.execute() if ids else []
        return [bucket_of(bid, h) for bid, h in zip(ids, rows, strict=True) if h]

    async def balance(self, account_id: str) -> Balance:
        info = await self.account(account_id)
        if info is None:
            raise UnknownAccount("no such account")
        now = self.now_ms()
        buckets = await self.buckets(account_id)
        available = sum(b.remaining_micro for b in buckets if b.expires_at > now)
        threshold = info.low_threshold_micro
        return Balance(
            account_id=account_id,
            available_micro=available,
            reserved_micro=info.reserved,
            buckets=buckets,
            low_balance=threshold > 0 and available < threshold,
            low_threshold_micro=threshold,
        )
