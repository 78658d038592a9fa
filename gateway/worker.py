"""The worker process (``python -m gateway worker``): the journal, expiry, stale holds, the spools of
dead web processes, a periodic reconcile, and what an operator needs to see of all that.

Health: every pass rewrites ``worker-health.json`` beside the SQLite file (``python -m gateway worker
--check`` reads it: exit 0 when the last pass is recent and whole); with WORKER_METRICS_PORT set, the
same figures as Prometheus text on ``/metrics`` (and ``/healthz``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from ledger.epoch import is_whole
from ledger.errors import LedgerLost
from ledger.journal import EXPIRE_EVERY_S, RELEASE_STALE_EVERY_S, JournalWorker, stream_id
from ledger.ledger import Ledger
from ledger.reconcile import reconcile
from ledger.spool import recover_orphans, spool_dir
from ledger.store import Store

__all__ = ["HEALTH_FILE", "STALE_AFTER_S", "WorkerHealth", "check", "health_path", "run_worker"]

log = logging.getLogger("gateway.worker")

HEALTH_FILE = "worker-health.json"
DRAIN_BUDGET_S = 5.0  # one pass's share of a backlog; well inside STALE_AFTER_S
STALE_AFTER_S = 30.0  # --check fails when the last pass is older than this
ORPHANS_EVERY_S = 5.0
GAUGES_EVERY_S = 10.0


def health_path(database_path: str | Path) -> Path:
    return Path(database_path).resolve().parent / HEALTH_FILE


@dataclass(slots=True)
class WorkerHealth:
    pid: int = 0
    at_ms: int = 0  # the last pass
    pass_ok: bool = False
    ledger_whole: bool = False
    applied_total: int = 0
    reconcile_ok: bool | None = None  # None: not run yet
    reconcile_problems: int = 0
    reconcile_at_ms: int = 0
    oldest_hold_age_s: float = 0.0
    journal_lag_events: int = 0
    journal_lag_s: float = 0.0
    redis_used_memory_bytes: int = 0
    replayed_total: int = 0
    interrupted_total: int = 0

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(asdict(self)))
        os.replace(tmp, path)

    def render(self) -> str:
        rows: list[tuple[str, str, str, float]] = [
            ("ledger_worker_last_pass_timestamp_seconds", "gauge", "When the worker last finished a pass.", self.at_ms / 1000),
            ("ledger_worker_pass_ok", "gauge", "1 when the last pass ran without an error.", int(self.pass_ok)),
            ("ledger_whole", "gauge", "1 when every shard has its epoch marker (0: run `python -m ledger rebuild`).", int(self.ledger_whole)),
            ("ledger_journal_applied_total", "counter", "Journal events applied to SQLite by this worker.", self.applied_total),
            ("ledger_reconcile_ok", "gauge", "1 when the last reconcile was green, 0 red, -1 not run yet.", -1 if self.reconcile_ok is None else int(self.reconcile_ok)),
            ("ledger_reconcile_problems", "gauge", "Problems the last reconcile reported.", self.reconcile_problems),
            ("ledger_reconcile_timestamp_seconds", "gauge", "When reconcile last ran.", self.reconcile_at_ms / 1000),
            ("ledger_oldest_open_hold_seconds", "gauge", "Age of the oldest open reservation (SQLite).", self.oldest_hold_age_s),
            ("ledger_journal_lag_events", "gauge", "Journal events in Redis not yet applied to SQLite.", self.journal_lag_events),
            ("ledger_journal_lag_seconds", "gauge", "Age of the oldest journal event not yet applied.", self.journal_lag_s),
            ("ledger_redis_used_memory_bytes", "gauge", "Redis INFO used_memory.", self.redis_used_memory_bytes),
            ("ledger_spool_replayed_total", "counter", "Settlements replayed from dead web processes' spools.", self.replayed_total),
            ("ledger_streams_interrupted_total", "counter", "Streams of dead web processes settled from their progress note.", self.interrupted_total),
        ]
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


def check(database_path: str | Path, *, now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """What `python -m gateway worker --check` says: (healthy, the health record or why not)."""
    path = health_path(database_path)
    try:
        h = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return False, {"error": f"no worker health record at {path}"}
    age = (time.time() if now is None else now) - h.get("at_ms", 0) / 1000
    ok = age <= STALE_AFTER_S and bool(h.get("pass_ok")) and bool(h.get("ledger_whole"))
    return ok, {**h, "age_s": round(age, 1)}


async def _gauges(ledger: Ledger, store: Store, health: WorkerHealth) -> None:
    now_ms = ledger.now_ms()
    oldest = await asyncio.to_thread(
        store.query, "SELECT min(created_ms) FROM reservations WHERE status = 'open'"
    )
    first = oldest[0][0] if oldest else None
    health.oldest_hold_age_s = max(0.0, (now_ms - int(first)) / 1000) if first is not None else 0.0
    pipe = ledger.redis.pipeline(transaction=False)
    for shard in ledger.keys.all_shards():
        pipe.xlen(ledger.keys.journal(shard))
        pipe.xrange(ledger.keys.journal(shard), "-", "+", count=1)
    got = await pipe.execute()
    lag_events, oldest_event = 0, None
    for n, head in zip(got[0::2], got[1::2], strict=True):
        lag_events += int(n)
        if head:
            ms = stream_id(str(head[0][0]))[0]
            oldest_event = ms if oldest_event is None else min(oldest_event, ms)
    health.journal_lag_events = lag_events
    health.journal_lag_s = max(0.0, (now_ms - oldest_event) / 1000) if oldest_event is not None else 0.0
    info = await ledger.redis.info("memory")
    health.redis_used_memory_bytes = int(info.get("used_memory", 0))


async def _serve_metrics(health: WorkerHealth, port: int) -> web.AppRunner:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=health.render(), content_type="text/plain", charset="utf-8")

    async def healthz(request: web.Request) -> web.Response:
        ok = health.pass_ok and health.ledger_whole and time.time() - health.at_ms / 1000 <= STALE_AFTER_S
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def run_worker(
    ledger: Ledger,
    store: Store,
    database_path: str | Path,
    stop: asyncio.Event,
    *,
    interval_s: float = 0.5,
    reconcile_every_s: float = 300.0,
    metrics_port: int = 0,
) -> None:
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    health = WorkerHealth(pid=os.getpid())
    path = health_path(database_path)
    spools = spool_dir(database_path)
    runner = await _serve_metrics(health, metrics_port) if metrics_port else None
    loop = asyncio.get_running_loop()
    due = {"expire": 0.0, "release": 0.0, "orphans": 0.0, "gauges": 0.0, "reconcile": loop.time() + min(10.0, reconcile_every_s)}
    lost_logged = 0.0
    try:
        while not stop.is_set():
            now = loop.time()
            try:
                # Markers are created by the web process and the ops CLI, never here: a worker must
                # not mistake a Redis that lost its data for a new ledger.
                health.ledger_whole = await is_whole(ledger)
                if not health.ledger_whole:
                    # Nothing is applied to or swept from a ledger that lost its data: the journal
                    # and the stale sweep would otherwise book an empty Redis as the truth.
                    if now >= lost_logged:
                        log.error("the ledger's Redis has lost its data: run `python -m ledger rebuild`")
                        lost_logged = now + 60.0
                else:
                    # Budgeted: a long backlog is drained in passes, and each pass ends with a
                    # fresh health record, so `worker --check` never takes a busy worker for dead.
                    health.applied_total += await worker.drain_once(budget_s=DRAIN_BUDGET_S)
                    if now >= due["expire"]:
                        await ledger.expire()
                        due["expire"] = now + EXPIRE_EVERY_S
                    if now >= due["release"]:
                        await ledger.release_stale()
                        due["release"] = now + RELEASE_STALE_EVERY_S
                    if now >= due["orphans"]:
                        replayed, interrupted = await recover_orphans(spools, ledger)
                        health.replayed_total += replayed
                        health.interrupted_total += interrupted
                        due["orphans"] = now + ORPHANS_EVERY_S
                    if now >= due["reconcile"]:
                        report = await reconcile(ledger, store)
                        health.reconcile_ok, health.reconcile_problems = report.ok, len(report.problems)
                        health.reconcile_at_ms = ledger.now_ms()
                        if not report.ok:
                            log.error("reconcile found %d problem(s); run `python -m ledger reconcile`", len(report.problems))
                        due["reconcile"] = now + reconcile_every_s
                if now >= due["gauges"]:
                    await _gauges(ledger, store, health)
                    due["gauges"] = now + GAUGES_EVERY_S
                health.pass_ok = True
            except (OSError, RedisError, sqlite3.OperationalError, LedgerLost) as exc:
                # Redis or the disk is away for a moment: keep the loop, the stream keeps the events.
                health.pass_ok = False
                log.warning("worker pass failed: %s", type(exc).__name__)
            except Exception as exc:
                # A bug (a malformed event): nothing of the batch was committed and the stream keeps
                # it; say so loudly on every pass until someone fixes it, and keep sweeping.
                health.pass_ok = False
                log.error("worker cannot apply a batch: %s", type(exc).__name__)
            health.at_ms = int(time.time() * 1000)
            try:
                await asyncio.to_thread(health.write, path)
            except OSError as exc:
                log.warning("cannot write the worker health record: %s", type(exc).__name__)
            if worker.behind:
                continue  # more journal waiting: the next pass at once
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass
        if health.ledger_whole:
            await worker.drain_once()
    finally:
        if runner is not None:
            await runner.cleanup()
