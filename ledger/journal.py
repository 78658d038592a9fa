"""The journal worker: copies each shard's event stream into the history, exactly once, then trims it.

At least once in, exactly once applied: a batch of events and the shard's cursor (the last applied
stream id) are written in one transaction of the history (SQLite or PostgreSQL); the stream is trimmed only after the commit. A crash
between the two leaves the events in the stream, and the next run skips them because the cursor,
re-read inside the transaction, already covers them. That re-read also keeps two workers from
applying the same batch twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.exceptions import RedisError

from .engines import UNAVAILABLE, Conn
from .keys import Keyspace
from .ledger import Ledger
from .money import iso_ms
from .personal import open_sealed
from .redis_client import AnyRedis
from .store import Store

__all__ = ["Event", "JournalWorker", "apply_events", "decode_draws", "stream_id"]

log = logging.getLogger("ledger.journal")

Event = tuple[str, dict[str, str]]

EXPIRE_EVERY_S = 30.0
RELEASE_STALE_EVERY_S = 10.0
# Redis or the history is away for a moment: the worker keeps its loop, the stream keeps the events.
_TRANSIENT: tuple[type[BaseException], ...] = (OSError, RedisError, *UNAVAILABLE)
MAINTAIN_EVERY_S = 3600.0  # the history's upkeep (PostgreSQL: next months' metering partitions)
ERASE_RETRY_S = 30.0  # a reader blocked the checkpoint after an erasure: try again this much later


def stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def decode_draws(enc: str | None) -> dict[str, int]:
    """'b1:30,b2:5' -> {'b1': 30, 'b2': 5} (a bucket appears once in a reservation's draws)."""
    out: dict[str, int] = {}
    for part in enc.split(",") if enc else ():
        bid, _, amt = part.rpartition(":")
        if bid:
            out[bid] = out.get(bid, 0) + int(amt)
    return out


class JournalWorker:
    def __init__(
        self,
        redis: AnyRedis,
        keyspace: Keyspace,
        store: Store,
        *,
        batch: int = 500,
        ledger: Ledger | None = None,
        after_commit: Callable[[int, str], None] | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be positive")
        self.redis = redis
        self.keys = keyspace
        self.store = store
        self.batch = batch
        self.ledger = ledger or Ledger(redis, keyspace)
        # Fault injection for tests: called with (shard, cursor) after the SQLite commit and before
        # the stream is trimmed; raising there is a crash between the two.
        self.after_commit = after_commit
        self.behind = False  # the last budgeted pass stopped with events left
        self._erased = False  # an erasure was committed and the WAL not yet emptied since
        self._erase_retry_at = 0.0

    async def drain_once(self, budget_s: float | None = None) -> int:
        """Apply every event now in the streams; returns how many were applied.

        With ``budget_s`` the pass stops after the first batch committed past that much time and
        sets ``behind``: a long backlog is drained in passes, so the caller can say it is alive
        (the worker's health record) between them."""
        applied = 0
        self.behind = False
        deadline = None if budget_s is None else time.monotonic() + budget_s
        cursors = await asyncio.to_thread(self.store.cursors)
        for shard in self.keys.all_shards():
            if deadline is not None and applied and time.monotonic() >= deadline:
                self.behind = True  # every pass commits something before it stops
                break
            applied += await self._drain_shard(shard, cursors.get(shard), deadline)
        if self._erased and time.monotonic() >= self._erase_retry_at:
            # An account closure was applied: its email and sub must leave the WAL's bytes too.
            self._erased = not await asyncio.to_thread(self.store.forget_erased)
            self._erase_retry_at = time.monotonic() + ERASE_RETRY_S if self._erased else 0.0
        return applied

    async def _drain_shard(self, shard: int, cursor: str | None, deadline: float | None = None) -> int:
        # `cursor` is only where to start reading; apply_batch re-reads it under the write lock.
        key = self.keys.journal(shard)
        applied = 0
        while True:
            start = f"({cursor}" if cursor else "-"
            raw = await self.redis.xrange(key, start, "+", count=self.batch)
            if not raw:
                return applied
            events: list[Event] = [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in raw]
            full = len(events) == self.batch
            if full:
                events = _hold_back_trailing_forfeits(events)
            await self._open_personal(shard, events)
            n, committed = await asyncio.to_thread(self.apply_batch, shard, events)
            applied += n
            cursor = committed
            if self.after_commit is not None:
                self.after_commit(shard, committed)
            ms, seq = stream_id(committed)
            # MINID drops ids strictly below it: the successor of the cursor drops the cursor too.
            # Exact trimming (not '~'), or nothing is dropped until a whole node is applied.
            await self.redis.xtrim(key, minid=f"{ms}-{seq + 1}", approximate=False)
            if any(f.get("t") == "account_closed" for _, f in events):
                self._erased = True
            if not full:
                return applied
            if deadline is not None and time.monotonic() >= deadline:
                self.behind = True
                return applied

    async def _open_personal(self, shard: int, events: list[Event]) -> None:
        """Open the sealed email and sub (ledger/personal.py) with each account's key, read from its
        record in the same shard, into the events in memory: the stream itself only ever holds them
        sealed. A closed account's key is gone, so its values open to nothing (NULL, as closing sets)."""
        accounts = sorted(
            {f.get("account", "") for _, f in events if f.get("email_sealed") or f.get("sub_sealed") or f.get("sealed")}
            - {""}
        )
        if not accounts:
            return
        pfx = self.keys.shard_prefix(shard)
        pipe = self.redis.pipeline(transaction=False)
        for acct in accounts:
            pipe.hget(pfx + "a:" + acct, "pii_key")
        keys = dict(zip(accounts, await pipe.execute(), strict=True))
        for _, f in events:
            acct = f.get("account", "")
            if f.get("t") == "account_created":
                f["email"] = open_sealed(keys.get(acct), acct, "email", f.pop("email_sealed", "")) or ""
                f["sub"] = open_sealed(keys.get(acct), acct, "sub", f.pop("sub_sealed", "")) or ""
            elif f.get("t") == "account_set" and "sealed" in f:
                opened = open_sealed(keys.get(acct), acct, f.get("field", ""), f.pop("sealed"))
                if opened is not None:
                    f["value"] = opened
                else:
                    f["field"] = ""  # unreadable: the account closed since; nothing to set

    def apply_batch(self, shard: int, events: Sequence[Event]) -> tuple[int, str]:
        """One transaction: apply the events after the stored cursor, advance it. Returns
        (applied, cursor). Safe to call twice with the same events: the second applies none."""
        return self.store.write(lambda conn: apply_events(conn, shard, events))

    async def run(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Drain, sweep expired buckets every ~30 s, release abandoned reservations every ~10 s,
        keep the history up (Store.maintain) every hour."""
        next_expire = next_release = next_maintain = time.monotonic()
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_maintain:
                    next_maintain = now + MAINTAIN_EVERY_S
                    await asyncio.to_thread(self.store.maintain)
                await self.drain_once()
                now = time.monotonic()
                if now >= next_expire:
                    await self.ledger.expire()
                    next_expire = now + EXPIRE_EVERY_S
                if now >= next_release:
                    await self.ledger.release_stale()
                    next_release = now + RELEASE_STALE_EVERY_S
            except _TRANSIENT as exc:
                # Redis or the disk is away for a moment: keep the loop, the stream keeps the events.
                log.warning("journal worker pass failed: %s", type(exc).__name__)
            except Exception as exc:
                # A bug (a malformed event): nothing of the batch was committed and the stream keeps
                # it; say so loudly on every pass until someone fixes it, and keep sweeping.
                log.error("journal worker cannot apply a batch: %s", type(exc).__name__)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass
        await self.drain_once()


def _hold_back_trailing_forfeits(events: list[Event]) -> list[Event]:
    """A give-back forfeit is journaled just before the settle/release of the same Lua call; keep
    the pair in one batch so no committed state shows the forfeit without its give-back."""
    end = len(events)
    while end > 0 and events[end - 1][1].get("t") == "forfeited":
        end -= 1
    return events[:end] if end > 0 else events


# ----- applying events --------------------------------------------------------------------------


def apply_events(conn: Conn, shard: int, events: Sequence[Event]) -> tuple[int, str]:
    row = conn.execute("SELECT last_id FROM journal_cursor WHERE shard = ?", (shard,)).fetchone()
    cursor = str(row[0]) if row else None
    last = stream_id(cursor) if cursor else (-1, -1)
    applied = 0
    ensured: set[str] = set()
    for eid, fields in events:
        if stream_id(eid) <= last:
            continue  # applied before (a crash before the trim, or another worker)
        _apply_one(conn, fields, ensured)
        last, cursor = stream_id(eid), eid
        applied += 1
    if applied:
        conn.execute(
            "INSERT INTO journal_cursor (shard, last_id) VALUES (?, ?) "
            "ON CONFLICT (shard) DO UPDATE SET last_id = excluded.last_id",
            (shard, cursor),
        )
    return applied, cursor or "0-0"


def _int(v: Any) -> int:
    """Event fields are integers written by the Lua scripts (%d) or counts in the metering JSON.
    Anything else is a bug upstream of the journal: refuse it (the batch is not applied and the
    stream keeps it) rather than book a guessed amount."""
    if v is None or v == "" or isinstance(v, bool):
        return int(bool(v))
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    raise ValueError("a journal field is not an integer")


def _ensure_account(conn: Conn, acct: str, ts: int) -> None:
    """An event for an account this file never saw created (history started late): keep a
    placeholder so the money still lands and reconcile can point at it."""
    conn.execute(
        "INSERT INTO accounts (account_id, status, created_at, created_ms) VALUES (?, 'active', ?, ?) "
        "ON CONFLICT DO NOTHING",
        (acct, iso_ms(ts), ts),
    )
    conn.execute("INSERT INTO account_totals (account_id) VALUES (?) ON CONFLICT DO NOTHING", (acct,))


def _totals(conn: Conn, acct: str, **deltas: int) -> None:
    sets = ", ".join(f"{k} = {k} + :{k}" for k in deltas)
    conn.execute(f"UPDATE account_totals SET {sets} WHERE account_id = :acct", {**deltas, "acct": acct})


def _bucket_delta(conn: Conn, bid: str, delta: int) -> None:
    if delta:
        cur = conn.execute(
            "UPDATE buckets SET remaining_micro = remaining_micro + ? WHERE bucket_id = ?", (delta, bid)
        )

        def check() -> None:
            if cur.rowcount == 0:
                log.warning("journal names unknown bucket %s", bid)

        # Before the commit, not now: on PostgreSQL reading the count now would wait for the answer.
        conn.defer(check)


def _apply_one(conn: Conn, e: dict[str, str], ensured: set[str] | None = None) -> None:
    t = e.get("t", "")
    ts = _int(e.get("ts"))
    at = iso_ms(ts)
    acct = e.get("account", "")
    if not acct:
        log.warning("journal event %s without account", t)
        return
    if ensured is None or acct not in ensured:
        # Once per account and batch: each statement is a round trip on PostgreSQL.
        _ensure_account(conn, acct, ts)
        if ensured is not None:
            ensured.add(acct)

    if t == "account_created":
        conn.execute(
            "UPDATE accounts SET email = ?, google_sub = ?, created_at = ?, created_ms = ?, "
            "low_threshold_micro = ? WHERE account_id = ? AND status = 'active'",
            (e.get("email") or None, e.get("sub") or None, at, ts, _int(e.get("low_threshold")), acct),
        )
    elif t == "account_set":
        if e.get("field") == "low_threshold":
            conn.execute(
                "UPDATE accounts SET low_threshold_micro = ? WHERE account_id = ?",
                (_int(e.get("value")), acct),
            )
        elif e.get("field") == "email":
            conn.execute(
                "UPDATE accounts SET email = ? WHERE account_id = ? AND status = 'active'",
                (e.get("value"), acct),
            )
    elif t == "account_closed":
        # Personal data goes for good; money and metering rows stay for accounting.
        conn.execute(
            "UPDATE accounts SET status = 'closed', email = NULL, google_sub = NULL, closed_at = ?, "
            "closed_ms = ? WHERE account_id = ?",
            (at, ts, acct),
        )
    elif t == "key_created":
        conn.execute(
            "INSERT INTO api_keys (key_id, account_id, key_hash, prefix, created_at, created_ms) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (e["key_id"], acct, e.get("hash", ""), e.get("prefix", ""), at, ts),
        )
    elif t == "key_revoked":
        conn.execute(
            "UPDATE api_keys SET revoked_at = ?, revoked_ms = ? WHERE key_id = ? AND revoked_ms IS NULL",
            (at, ts, e["key_id"]),
        )
    elif t == "credited":
        amount, expires = _int(e.get("amount")), _int(e.get("expires_at"))
        conn.execute(
            "INSERT INTO buckets (bucket_id, account_id, amount_micro, remaining_micro, expires_at, expires_ms, "
            "source, reference, created_at, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                e["bucket"],
                acct,
                amount,
                amount,
                iso_ms(expires),
                expires,
                e.get("source", ""),
                e.get("ref", ""),
                at,
                ts,
            ),
        )
        _totals(conn, acct, credited=amount)
    elif t == "reserved":
        held, enc = _int(e.get("held")), e.get("draws", "")
        for bid, amt in decode_draws(enc).items():
            _bucket_delta(conn, bid, -amt)
        conn.execute(
            "INSERT INTO reservations (request_id, account_id, key_id, held_micro, draws, status, "
            "created_at, created_ms, deadline_ms) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?) "
            # A row made anew, as SQLite's INSERT OR REPLACE would (on both engines).
            "ON CONFLICT (request_id) DO UPDATE SET account_id = excluded.account_id, "
            "key_id = excluded.key_id, held_micro = excluded.held_micro, draws = excluded.draws, "
            "status = 'open', reason = NULL, created_at = excluded.created_at, "
            "created_ms = excluded.created_ms, finished_at = NULL, finished_ms = NULL, "
            "deadline_ms = excluded.deadline_ms, charged_micro = NULL, shortfall_micro = NULL, "
            "final_draws = NULL",
            (e["req"], acct, e.get("key_id", ""), held, enc, at, ts, _int(e.get("deadline"))),
        )
        _totals(conn, acct, reserved=held)
    elif t == "settled":
        _apply_settled(conn, e, acct, ts)
    elif t == "released":
        held = _int(e.get("held"))
        row = conn.execute(
            "SELECT draws, status FROM reservations WHERE request_id = ?", (e["req"],)
        ).fetchone()
        if row is not None and row["status"] == "open":
            # Every draw goes back. A bucket that expired meanwhile forfeited it instead: that
            # `forfeited` event came first and took it off `remaining`, so adding it back here nets out.
            for bid, amt in decode_draws(row["draws"]).items():
                _bucket_delta(conn, bid, amt)
        elif held:
            log.warning("released %s held %d but the reservation was not open here", e["req"], held)
        conn.execute(
            "UPDATE reservations SET status = 'released', reason = ?, finished_at = ?, finished_ms = ? "
            "WHERE request_id = ? AND status = 'open'",
            (e.get("reason", ""), at, ts, e["req"]),
        )
        _totals(conn, acct, reserved=-held)
    elif t == "refunded":
        amount = _int(e.get("amount"))
        _bucket_delta(conn, e["bucket"], -amount)
        conn.execute(
            "INSERT INTO refunds (refund_id, account_id, bucket_id, amount_micro, status, created_at, created_ms) "
            "VALUES (?, ?, ?, ?, 'taken', ?, ?)",
            (e["refund_id"], acct, e["bucket"], amount, at, ts),
        )
        _totals(conn, acct, refunded=amount)
    elif t in ("refund_confirmed", "refund_reverted"):
        status = t.removeprefix("refund_")
        conn.execute(
            "UPDATE refunds SET status = ?, external_ref = ?, finished_at = ? WHERE refund_id = ?",
            (status, e.get("external_ref") or None, at, e["refund_id"]),
        )
        if status == "reverted":
            amount = _int(e.get("amount"))
            _bucket_delta(conn, e["bucket"], amount)  # nets out with a preceding forfeit, as above
            _totals(conn, acct, refunded=-amount)
    elif t == "forfeited":
        amount = _int(e.get("amount"))
        # Always off `remaining`: the sweep and closing take the whole remaining; a give-back to an
        # expired bucket is added back by the settle/release/revert event that follows it.
        _bucket_delta(conn, e["bucket"], -amount)
        conn.execute(
            "INSERT INTO forfeitures (account_id, bucket_id, amount_micro, at, at_ms) VALUES (?, ?, ?, ?, ?)",
            (acct, e["bucket"], amount, at, ts),
        )
        _totals(conn, acct, forfeited=amount)
    elif t == "topup_created":
        conn.execute(
            "INSERT INTO topups (topup_id, account_id, amount_micro, amount_minor, currency, method, "
            "status, created_at, created_ms, updated_at, updated_ms) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (
                e["topup"],
                acct,
                _int(e.get("amount")),
                _int(e.get("minor")),
                e.get("currency", ""),
                e.get("method", ""),
                at,
                ts,
                at,
                ts,
            ),
        )
    elif t == "topup_updated":
        conn.execute(
            "UPDATE topups SET status = ?, charge_id = ?, failure_code = ?, failure_message = ?, bucket_id = ?, "
            "updated_at = ?, updated_ms = ? WHERE topup_id = ?",
            (
                e.get("status", "pending"),
                e.get("charge") or None,
                e.get("failure_code") or None,
                e.get("failure_message") or None,
                e.get("bucket") or None,
                at,
                ts,
                e["topup"],
            ),
        )
    elif t == "low_balance":
        conn.execute(
            "INSERT INTO low_balance_events (account_id, available_micro, threshold_micro, at) VALUES (?, ?, ?, ?)",
            (acct, _int(e.get("available")), _int(e.get("threshold")), at),
        )
    else:
        log.warning("journal event of unknown type %s skipped", t)


def _apply_settled(conn: Conn, e: dict[str, str], acct: str, ts: int) -> None:
    req = e["req"]
    held, charged = _int(e.get("held")), _int(e.get("charged"))
    final = decode_draws(e.get("draws", ""))
    row = conn.execute(
        "SELECT key_id, draws, status FROM reservations WHERE request_id = ?", (req,)
    ).fetchone()
    # held 0: the reservation was released or never made, so every final draw is a fresh one.
    reserved = decode_draws(row["draws"]) if held and row is not None and row["status"] == "open" else {}
    if held and not reserved and row is None:
        log.warning("settled %s held %d but the reservation is unknown here", req, held)
    for bid in {*final, *reserved}:
        # Less than reserved: the surplus went back (or was forfeited by an event just before);
        # more: the overrun was drawn now.
        _bucket_delta(conn, bid, reserved.get(bid, 0) - final.get(bid, 0))
    _totals(conn, acct, reserved=-held, consumed=charged)

    try:
        m = orjson.loads(e.get("metering") or "{}")
    except orjson.JSONDecodeError:
        m = {}
    if not isinstance(m, dict):
        m = {}
    key_id = str(m.get("key_id") or (row["key_id"] if row is not None else "") or "")
    at = iso_ms(ts)
    if row is None:
        conn.execute(
            "INSERT INTO reservations (request_id, account_id, key_id, held_micro, draws, status, created_at, "
            "created_ms) VALUES (?, ?, ?, 0, '', 'settled', ?, ?)",
            (req, acct, key_id, at, ts),
        )
    conn.execute(
        "UPDATE reservations SET status = CASE status WHEN 'open' THEN 'settled' ELSE status END, "
        "finished_at = coalesce(finished_at, ?), finished_ms = coalesce(finished_ms, ?), charged_micro = ?, "
        "shortfall_micro = ?, final_draws = ? WHERE request_id = ?",
        (at, ts, charged, _int(e.get("shortfall")), e.get("draws", ""), req),
    )
    draws_json = orjson.dumps([{"bucket_id": b, "amount_micro": a} for b, a in final.items()]).decode()
    _insert_metering(conn, e, m, req, acct, key_id, charged, draws_json, at, ts)
    if key_id:
        conn.execute(
            "UPDATE api_keys SET last_used_at = ?, last_used_ms = ? WHERE key_id = ?", (at, ts, key_id)
        )


def _insert_metering(
    conn: Conn,
    e: dict[str, str],
    m: dict[str, Any],
    req: str,
    acct: str,
    key_id: str,
    charged: int,
    draws_json: str,
    at: str | None,
    ts: int,
) -> None:
    def text(k: str) -> str | None:
        v = m.get(k)
        return None if v is None else str(v)

    # One row per request, kept by NOT EXISTS rather than by a unique index: PostgreSQL's metering
    # is partitioned by month and cannot hold one on request_id alone (ledger/schema.py). Writers
    # run one at a time (the history's write lock), so the check cannot race. The casts type the
    # selected parameters for PostgreSQL (in VALUES the columns would); SQLite keeps the values.
    conn.execute(
        "INSERT INTO metering (request_id, account_id, key_id, model, provider, upstream_model, "
        "input_cache_hit_tokens, input_cache_miss_tokens, output_tokens, charge_micro, draws, status, "
        "started_at, finished_at, latency_ms, shortfall_micro, estimated, cache_write_tokens, finished_ms) "
        f"SELECT {_METERING_TYPES} WHERE NOT EXISTS (SELECT 1 FROM metering WHERE request_id = ?)",
        (
            req,
            acct,
            key_id or None,
            text("model"),
            text("provider"),
            text("upstream_model"),
            _int(m.get("input_cache_hit_tokens")),
            _int(m.get("input_cache_miss_tokens")),
            _int(m.get("output_tokens")),
            charged,
            draws_json,
            text("status"),
            text("started_at"),
            text("finished_at") or at,
            _int(m.get("latency_ms")) if m.get("latency_ms") is not None else None,
            _int(e.get("shortfall")),
            1 if m.get("estimated") else 0,
            _int(m.get("cache_write_tokens")),
            ts,
            req,
        ),
    )


_METERING_TYPES = ", ".join(
    f"CAST(? AS {t})"
    for t in ("TEXT",) * 6 + ("BIGINT",) * 4 + ("TEXT",) * 4 + ("BIGINT",) * 5
)
