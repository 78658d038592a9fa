"""The ops CLI, `python -m ledger COMMAND` (SPEC 6): exit 0 done, 1 refused (one line on stderr), 2 bad usage."""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys as K
from .config import ConfigError, LedgerConfig
from .epoch import history_in, open_ledger
from .errors import LedgerError, LedgerLost
from .journal import JournalWorker
from .ledger import DEFAULT_BUCKET_LIFE_S, Ledger
from .money import iso_ms, parse_amount
from .rebuild import RebuildRefused, rebuild, repair
from .reconcile import drain_all, reconcile
from .redis_client import AnyRedis, connect
from .store import METERING_COLUMNS, Store

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "BadUsage", "CliParser", "Ctx", "Refused", "build_parser", "id_arg", "main", "run_cli"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class Refused(Exception):
    """A refused operation: exit 1 with this one line."""


class BadUsage(Exception):
    """Arguments that parse but make no sense: exit 2."""


@dataclass
class Ctx:
    config: LedgerConfig
    json: bool
    out: TextIO
    _redis: AnyRedis | None = None
    _store: Store | None = None
    # The environment the command runs in (`python -m gateway payments` reads OMISE_* from it).
    environ: Mapping[str, str] = field(default_factory=dict)

    async def ledger(self) -> Ledger:
        opened = self._redis is not None
        if self._redis is None:
            try:
                url = self.config.resolve_redis_url()
            except ConfigError as exc:
                raise Refused(str(exc)) from None
            try:
                # A single server or any node of a Redis Cluster (detected).
                self._redis = await connect(url, failover_wait_s=5.0)
                await self._redis.ping()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise Refused("cannot reach the ledger's Redis (check REDIS_URL)") from None
        ledger = Ledger(self._redis, self.config.keyspace, done_ttl_s=self.config.done_ttl_s)
        if not opened:
            # A new ledger gets its epoch markers here; a lost one stays lost (commands refuse with
            # LedgerLost, `rebuild` restores it).
            await open_ledger(ledger, history_in(self.store()))
        return ledger

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.history_target)
            self._store.migrate()  # idempotent; the release process normally did it already
        return self._store

    def audit(self, action: str, target: str, detail: dict[str, Any], at_ms: int) -> None:
        self.store().audit(actor=self.config.actor, action=action, target=target, detail=detail, at_ms=at_ms)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._store is not None:
            self._store.close()

    def emit(self, data: Any) -> None:
        if self.json:
            self.out.write(orjson.dumps(data).decode() + "\n")
        elif isinstance(data, dict):
            for k, v in data.items():
                text = orjson.dumps(v).decode() if isinstance(v, (list, dict)) else v
                self.out.write(f"{k}: {text}\n")
        else:
            self.out.write(f"{data}\n")


# ----- commands ---------------------------------------------------------------------------------


def id_arg(kind: str, ident: str) -> str:
    """An id from the command line: one of the wrong shape names nothing, like an unknown one."""
    try:
        K.shard_of(ident)
    except ValueError:
        ident = ""
    if not ident.startswith(f"{kind}_"):
        raise Refused({"acc": "no such account", "key": "no such live key", "bkt": "no such bucket"}[kind])
    return ident


async def cmd_account_create(ctx: Ctx, a: argparse.Namespace) -> int:
    ledger = await ctx.ledger()
    account_id, created = await ledger.create_account(a.email, reference=a.ref or None)
    detail: dict[str, Any] = {"created": created}
    if a.ref:
        detail["ref"] = a.ref
    ctx.audit("account.create", account_id, detail, ledger.now_ms())
    ctx.emit({"account_id": account_id})
    return EXIT_OK


async def cmd_key_create(ctx: Ctx, a: argparse.Namespace) -> int:
    account = id_arg("acc", a.account)
    ledger = await ctx.ledger()
    new = await ledger.create_key(account, reference=a.ref or None)
    detail: dict[str, Any] = {"key_id": new.key_id, "prefix": new.prefix}
    if a.ref:
        detail.update(ref=a.ref, created=new.created)
    ctx.audit("key.create", account, detail, ledger.now_ms())
    if not new.created:
        sys.stderr.write(
            f"key {new.key_id} was made by an earlier run with this --ref; its key was shown then "
            f"(`key renew {new.key_id}` gives a new one)\n"
        )
    ctx.emit({"key_id": new.key_id, "key": new.key or None})
    return EXIT_OK


async def cmd_key_renew(ctx: Ctx, a: argparse.Namespace) -> int:
    id_arg("key", a.key_id)
    ledger = await ctx.ledger()
    account = await ledger.key_account(a.key_id)
    new = await ledger.rotate_key(a.key_id)
    ctx.audit(
        "key.renew",
        account or "",
        {"old_key_id": a.key_id, "key_id": new.key_id, "prefix": new.prefix},
        ledger.now_ms(),
    )
    ctx.emit({"key_id": new.key_id, "key": new.key})
    return EXIT_OK


async def cmd_key_revoke(ctx: Ctx, a: argparse.Namespace) -> int:
    id_arg("key", a.key_id)
    ledger = await ctx.ledger()
    account = await ledger.revoke_key(a.key_id)
    ctx.audit("key.revoke", account, {"key_id": a.key_id}, ledger.now_ms())
    ctx.emit({"key_id": a.key_id})
    return EXIT_OK


async def cmd_grant(ctx: Ctx, a: argparse.Namespace) -> int:
    try:
        amount = parse_amount(a.amount)
    except ValueError as exc:
        raise BadUsage(f"AMOUNT: {exc}") from None
    if a.expires_in <= 0:
        raise BadUsage("--expires-in must be a positive number of seconds")
    account = id_arg("acc", a.account)
    ledger = await ctx.ledger()
    # With --ref a retried grant finds the first one's bucket (credit references are idempotent,
    # and a rebuild restores them): it credits once.
    reference = f"grant:{account}:{a.ref}" if a.ref else f"grant_{uuid.uuid4().hex}"
    credit = await ledger.credit(account, amount, reference=reference, source="grant", life_s=a.expires_in)
    if not credit.created and credit.amount_micro != amount:
        raise Refused(
            f"--ref {a.ref} already granted {credit.amount_micro} micro-units (bucket {credit.bucket_id})"
        )
    detail: dict[str, Any] = {
        "bucket_id": credit.bucket_id,
        "amount_micro": credit.amount_micro,
        "expires_at": iso_ms(credit.expires_at),
    }
    if a.reason:
        detail["reason"] = a.reason
    if a.ref:
        detail.update(ref=a.ref, created=credit.created)
    ctx.audit("grant", account, detail, ledger.now_ms())
    ctx.emit(
        {
            "bucket_id": credit.bucket_id,
            "amount_micro": credit.amount_micro,
            "expires_at": iso_ms(credit.expires_at),
        }
    )
    return EXIT_OK


async def cmd_balance(ctx: Ctx, a: argparse.Namespace) -> int:
    account = id_arg("acc", a.account)
    ledger = await ctx.ledger()
    bal = await ledger.balance(account)
    now = ledger.now_ms()
    ctx.emit(
        {
            "account_id": bal.account_id,
            "currency": ctx.config.currency,
            "available_micro": bal.available_micro,
            "reserved_micro": bal.reserved_micro,
            "buckets": [
                {
                    "bucket_id": b.bucket_id,
                    "amount_micro": b.amount_micro,
                    "remaining_micro": b.remaining_micro,
                    "expires_at": iso_ms(b.expires_at),
                    "source": b.source,
                }
                for b in bal.buckets
                if b.expires_at > now  # expired credit is forfeited, not part of the balance
            ],
        }
    )
    return EXIT_OK


async def cmd_usage(ctx: Ctx, a: argparse.Namespace) -> int:
    store = ctx.store()
    # Bring the history up to date when the live ledger is reachable; the rows are SQLite's anyway.
    try:
        ledger = await ctx.ledger()
        await drain_all(ledger, store)
    except Refused:
        pass
    if not store.query("SELECT 1 FROM accounts WHERE account_id = ?", (a.account,)):
        raise Refused("no such account")
    rows = store.iter_usage(a.account)
    fmt = a.format or ("json" if ctx.json else "csv")
    if fmt == "csv":
        w = csv.writer(ctx.out, lineterminator="\n")
        w.writerow(METERING_COLUMNS)
        for row in rows:
            w.writerow([orjson.dumps(row[c]).decode() if c == "draws" else row[c] for c in METERING_COLUMNS])
    elif fmt == "jsonl":
        for row in rows:
            ctx.out.write(orjson.dumps(row).decode() + "\n")
    else:
        ctx.out.write(orjson.dumps(list(rows)).decode() + "\n")
    return EXIT_OK


async def cmd_expire(ctx: Ctx, a: argparse.Namespace) -> int:
    ledger = await ctx.ledger()
    buckets, forfeited = await ledger.expire()
    ctx.emit({"forfeited_micro": forfeited, "buckets": buckets})
    return EXIT_OK


async def cmd_reconcile(ctx: Ctx, a: argparse.Namespace) -> int:
    report = await reconcile(await ctx.ledger(), ctx.store())
    ctx.emit(report.as_json())
    if not report.ok:
        raise Refused(f"reconcile found {len(report.problems)} problem(s)")
    return EXIT_OK


async def cmd_rebuild(ctx: Ctx, a: argparse.Namespace) -> int:
    try:
        result = await rebuild(await ctx.ledger(), ctx.store(), force=a.force, actor=ctx.config.actor)
    except RebuildRefused as exc:
        raise Refused(str(exc)) from None
    ctx.emit(result.as_json())
    return EXIT_OK


async def cmd_backup(ctx: Ctx, a: argparse.Namespace) -> int:
    dest = os.path.abspath(a.dest)
    if os.path.exists(dest):
        raise Refused(f"{dest} exists; give a new file name")
    if ctx.config.database_url:
        raise Refused("the history is in PostgreSQL: back it up with pg_dump or your provider's backups")
    ctx.store()  # the schema exists before it is copied

    def copy() -> int:
        # SQLite's online backup: a consistent snapshot while the worker keeps writing.
        src = sqlite3.connect(ctx.config.database_path)
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            return int(out.execute("SELECT count(*) FROM accounts").fetchone()[0])
        finally:
            out.close()
            src.close()

    accounts = await asyncio.to_thread(copy)
    ctx.audit("backup", dest, {"accounts": accounts}, int(time.time() * 1000))
    ctx.emit({"path": dest, "accounts": accounts})
    return EXIT_OK


async def cmd_repair(ctx: Ctx, a: argparse.Namespace) -> int:
    result = await repair(await ctx.ledger(), ctx.store(), actor=ctx.config.actor)
    ctx.emit(result.as_json())
    if result.problems_after:
        raise Refused(f"{len(result.problems_after)} problem(s) left after the repair; see docs/operations.md")
    return EXIT_OK


async def cmd_migrate(ctx: Ctx, a: argparse.Namespace) -> int:
    ctx.emit({"version": ctx.store().migrate()})
    return EXIT_OK


async def cmd_worker(ctx: Ctx, a: argparse.Namespace) -> int:
    ledger = await ctx.ledger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = JournalWorker(ledger.redis, ledger.keys, ctx.store(), ledger=ledger)
    sys.stderr.write("ledger worker: draining the journal until SIGTERM\n")
    sys.stderr.flush()
    await worker.run(stop, interval_s=a.interval)
    return EXIT_OK


# ----- top-ups (the Omise commands are `python -m gateway payments`) -----------------------------


async def cmd_topups(ctx: Ctx, a: argparse.Namespace) -> int:
    store = ctx.store()
    ledger = await ctx.ledger()
    await drain_all(ledger, store)
    where, params = [], []
    if a.status:
        where.append("status = ?")
        params.append(a.status)
    if a.account:
        where.append("account_id = ?")
        params.append(a.account)
    sql = "SELECT * FROM topups" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_ms"
    rows = [
        {
            "topup_id": r["topup_id"],
            "account_id": r["account_id"],
            "status": r["status"],
            "amount_micro": r["amount_micro"],
            "currency": r["currency"],
            "method": r["method"],
            "charge_id": r["charge_id"],
            "bucket_id": r["bucket_id"],
            "failure_code": r["failure_code"],
            "failure_message": r["failure_message"],
            "created_at": r["created_at"],
            "updated_at": r["updated_at"],
        }
        for r in store.query(sql, tuple(params))
    ]
    ctx.audit("topups.list", a.account or "*", {"status": a.status or "", "rows": len(rows)}, ledger.now_ms())
    if ctx.json:
        ctx.emit(rows)
    else:
        for row in rows:
            ctx.out.write(
                f"{row['topup_id']} {row['account_id']} {row['status']} {row['amount_micro']} "
                f"{row['charge_id'] or '-'} {row['failure_code'] or ''}\n"
            )
    return EXIT_OK


# ----- parsing ----------------------------------------------------------------------------------

Command = Callable[[Ctx, argparse.Namespace], Awaitable[int]]


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own: usage on stderr, exit 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


_REF_HELP = "idempotency reference: a retry with the same one does the operation once"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m ledger", description="Coding Plan ledger operations (SPEC 6).")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CliParser)

    def cmd(parent: Any, name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.set_defaults(fn=fn)
        return sp

    account = sub.add_parser("account", help="accounts").add_subparsers(
        dest="sub", required=True, parser_class=CliParser
    )
    ac = cmd(account, "create", cmd_account_create, "create an account")
    ac.add_argument("email")
    ac.add_argument("--ref", default="", help=_REF_HELP)
    key = sub.add_parser("key", help="API keys").add_subparsers(
        dest="sub", required=True, parser_class=CliParser
    )
    kc = cmd(key, "create", cmd_key_create, "new API key, shown once")
    kc.add_argument("account")
    kc.add_argument("--ref", default="", help=_REF_HELP)
    cmd(key, "renew", cmd_key_renew, "rotate a key").add_argument("key_id")
    cmd(key, "revoke", cmd_key_revoke, "revoke a key").add_argument("key_id")
    g = cmd(sub, "grant", cmd_grant, "manual credit bucket")
    g.add_argument("account")
    g.add_argument("amount", help="currency units, e.g. 100 or 12.5")
    g.add_argument("--expires-in", type=int, default=DEFAULT_BUCKET_LIFE_S, metavar="SECONDS")
    g.add_argument("--reason", default="")
    g.add_argument("--ref", default="", help=_REF_HELP)
    cmd(sub, "balance", cmd_balance, "as GET /v1/balance").add_argument("account")
    u = cmd(sub, "usage", cmd_usage, "the account's metering rows")
    u.add_argument("account")
    u.add_argument("--format", choices=("csv", "jsonl"))
    cmd(sub, "expire", cmd_expire, "forfeit what expired now")
    cmd(sub, "reconcile", cmd_reconcile, "check conservation in Redis and the history")
    cmd(sub, "rebuild", cmd_rebuild, "restore Redis from the history after Redis was lost").add_argument(
        "--force", action="store_true", help="replace a ledger that still has keys"
    )
    cmd(sub, "repair", cmd_repair, "fix what reconcile flags from the history (audited)")
    cmd(sub, "backup", cmd_backup, "a consistent copy of the SQLite history, for off-site").add_argument("dest")
    cmd(sub, "migrate", cmd_migrate, "create or upgrade the history's schema (SQLite or PostgreSQL)")
    t = cmd(sub, "topups", cmd_topups, "list top-ups (Omise charges and what became of them)")
    t.add_argument("--status", choices=("pending", "successful", "failed", "expired"))
    t.add_argument("--account")
    cmd(sub, "worker", cmd_worker, "drain the journal until SIGTERM").add_argument(
        "--interval", type=float, default=0.5, metavar="SECONDS"
    )
    return p


async def _run(fn: Command, ctx: Ctx, args: argparse.Namespace) -> int:
    try:
        return await fn(ctx, args)
    finally:
        await ctx.close()


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    return run_cli(build_parser(), "ledger", argv, environ)


def run_cli(
    parser: argparse.ArgumentParser,
    label: str,
    argv: Sequence[str] | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Parse, run the chosen command and turn its outcome into an exit code and one line on stderr.
    Shared with `python -m gateway payments`, which runs its Omise commands over the same Ctx."""
    raw = list(sys.argv[1:] if argv is None else argv)
    # `--json` is accepted anywhere, before or after the command and its arguments.
    want_json = "--json" in raw
    raw = [x for x in raw if x != "--json"]
    args = parser.parse_args(raw)
    try:
        config = LedgerConfig.from_env(environ)
    except ConfigError as exc:
        sys.stderr.write(f"{label}: {exc}\n")
        return EXIT_USAGE
    ctx = Ctx(
        config=config,
        json=want_json,
        out=sys.stdout,
        environ=dict(os.environ if environ is None else environ),
    )
    name = " ".join(x for x in (label, args.command, getattr(args, "sub", None)) if x)
    try:
        return asyncio.run(_run(args.fn, ctx, args))
    except BadUsage as exc:
        sys.stderr.write(f"{name}: {exc}\n")
        return EXIT_USAGE
    except LedgerLost:
        sys.stderr.write(f"ledger {name}: the ledger's Redis lost its data; run `python -m ledger rebuild`\n")
        return EXIT_REFUSED
    except (Refused, LedgerError) as exc:
        sys.stderr.write(f"{name}: {exc}\n")
        return EXIT_REFUSED
    except (RedisConnectionError, RedisTimeoutError):
        sys.stderr.write(f"{name}: lost the connection to the ledger's Redis\n")
        return EXIT_REFUSED
    except MovedError:
        sys.stderr.write(
            f"{name}: the ledger's Redis answered MOVED: REDIS_URL names one node of a Redis Cluster\n"
        )
        return EXIT_REFUSED
    except RedisError as exc:
        sys.stderr.write(f"{name}: the ledger's Redis refused the command ({type(exc).__name__})\n")
        return EXIT_REFUSED
    except ValueError as exc:
        # Malformed amounts from the command line.
        sys.stderr.write(f"{name}: {exc}\n")
        return EXIT_USAGE
    except Exception as exc:
        # SPEC 6: a one-line reason, never a traceback (the type only: a message can quote data).
        sys.stderr.write(f"{name}: failed ({type(exc).__name__}); nothing further was done\n")
        return EXIT_REFUSED
