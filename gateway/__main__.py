"""``python -m gateway serve`` (the web process), ``python -m gateway worker`` (journal, expiry, sweeps) and
``python -m gateway payments ...`` (the operators' Omise commands: refund, sync-omise)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

import orjson
from aiohttp import web

from .appkeys import DEMO, REGISTRY
from .client_setup import tool_setups
from .settings import ConfigError, Settings

log = logging.getLogger("gateway")


class _Formatter(logging.Formatter):
    """The default format, its time stamp made once a second: a line a request is logged, and
    formatting the date took as long as the rest of the record."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created)))
        return f"{self._second[1]},{int(record.msecs):03d}"


class _GatheredLines(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, with lines below WARNING gathered on the event loop's thread and written together at
    most FLUSH_S later: a line a request was a write(2) a request. A warning or an error is written at
    once, after the lines gathered before it; so is every line from another thread or outside a
    loop, and whatever is gathered when logging shuts down (at exit). A process killed with -9
    loses at most FLUSH_S of info lines, never a warning."""

    FLUSH_S = 0.05

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._gathered: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            self._gathered.append(self.format(record) + self.terminator)
            if record.levelno < logging.WARNING:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None  # not on a loop's thread: written now
                if loop is not None:
                    if self._timer is None or self._timer_loop is not loop:
                        self._timer, self._timer_loop = loop.call_later(self.FLUSH_S, self._planned), loop
                    return  # a write is planned on this loop
            self._write()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _planned(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._timer = None
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        # (A planned write still runs: it finds nothing. Another thread never touches the timer.)
        lines, self._gathered = self._gathered, []
        if lines:
            self.stream.write("".join(lines))
        super().flush()


def _logging(level: str) -> None:
    # A line a request is logged: leave out what the format never prints (logging's documented
    # optimisations): the caller's file and line, the thread's and the process's names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _GatheredLines(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # aiohttp's access log prints the full request line (query strings included): ours logs ids only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _tune_gc() -> None:
    """Once the server is up: what start-up built (modules, the app, the registry: ~80k objects)
    moves out of the collector's sight, and the young generation is collected every 10,000
    allocations rather than every 700. Measured under load (c=32-256): the collector's passes cost
    ~30 us a request, most of it full passes over objects that live as long as the process. A
    request's garbage is freed by reference counting; only cycles wait for the collector (a
    cancelled stream's exception, traceback and frames, which may hold its body), and a full pass
    still comes every ~1M allocations (10,000 x 10 x 10), some hundreds of requests."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def startup_warnings(settings: Settings) -> list[str]:
    """What an operator must not miss: said loudly at start-up (stderr and the log)."""
    out = []
    if settings.requested_host is not None:
        out.append(
            f"HOST={settings.requested_host} ignored: the embedded default (no REDIS_URL) has a demo "
            "sign-in and play credit, so it listens on 127.0.0.1 only. Set REDIS_URL and SESSION_SECRET "
            "to serve other machines."
        )
    if settings.omise_enabled and not settings.omise_webhook_secret:
        out.append(
            "OMISE_WEBHOOK_SECRET is not set: Omise webhook events are accepted unsigned (each forged "
            "post costs a call to Omise). Copy the webhook secret from Omise's dashboard "
            "(Settings > Webhooks) into OMISE_WEBHOOK_SECRET."
        )
    return out


def _banner(settings: Settings, app: web.Application, port: int) -> None:
    demo = app.get(DEMO)
    base = f"http://{settings.host}:{port}"
    lines = [
        "",
        "Coding Plan gateway: EMBEDDED DEFAULT (in-process Redis, SQLite under ./var). Not for production:",
        "set REDIS_URL and SESSION_SECRET to run it for real.",
        f"Listening on {base}",
    ]
    if demo:
        account_id, key = demo
        lines += [
            f"Demo account {account_id} with play credit. Its API key (shown once):",
            f"  {key}",
            "Try it:",
            f"  curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"demo\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'",
        ]
        model = app[REGISTRY].suggested_model()
        for setup in tool_setups(base, key, model=model):
            lines += [f"{setup.tool} ({setup.where}):", *(f"  {line}" for line in setup.text.splitlines())]
    print("\n".join(lines), flush=True)


async def serve(settings: Settings) -> None:
    from .app import create_app
    from .durability import shutdown_budget
    from .server import GatewayRunner

    app = create_app(settings)
    # handler_cancellation: a client that goes away cancels its handler at once, which aborts the
    # upstream request; the bill is settled in the handler's finally.
    _, handler_s = shutdown_budget(settings.shutdown_grace_s)
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=handler_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    _tune_gc()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    for warning in startup_warnings(settings):
        log.warning("%s", warning)
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    if settings.embedded:
        _banner(settings, app, port)
    else:
        log.info("listening on %s:%d", settings.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight streams (up to %.0fs)", settings.shutdown_grace_s)
    await runner.cleanup()


async def work(settings: Settings) -> None:
    from ledger.connection import log_redis_problems
    from ledger.keys import Keyspace
    from ledger.ledger import Ledger
    from ledger.redis_client import connect
    from ledger.store import Store

    from .worker import run_worker

    if settings.redis_url is None:
        raise ConfigError("REDIS_URL is required for a separate worker (the embedded default runs its own)")
    # A single server or any node of a Redis Cluster (detected): ledger/redis_client.py.
    redis = await connect(settings.redis_url, pool_size=8)
    keyspace = Keyspace(prefix=settings.ledger_prefix, shards=settings.ledger_shards)
    store = Store(settings.history_target)
    await asyncio.to_thread(store.migrate)
    ledger = Ledger(redis, keyspace, done_ttl_s=settings.ledger_done_ttl_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker started shards=%d", keyspace.shards)
    try:
        await log_redis_problems(redis)
        await run_worker(
            ledger,
            store,
            settings.database_path,
            stop,
            reconcile_every_s=settings.reconcile_every_s,
            metrics_port=settings.worker_metrics_port,
        )
    finally:
        store.close()
        await redis.aclose()


def check_worker(settings: Settings) -> int:
    """`python -m gateway worker --check`: 0 when the worker's last pass is recent and whole."""
    from .worker import check

    ok, record = check(settings.database_path)
    print(orjson.dumps({"ok": ok, **record}).decode())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["payments"]:
        from .payments.ops import main as payments_main

        return payments_main(raw[1:])
    parser = argparse.ArgumentParser(prog="python -m gateway")
    parser.add_argument("command", choices=["serve", "worker", "payments"])
    parser.add_argument("--check", action="store_true", help="worker: exit 0 if the running worker is healthy")
    args = parser.parse_args(raw)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.check:
        return check_worker(settings)
    _logging(settings.log_level)
    try:
        asyncio.run(serve(settings) if args.command == "serve" else work(settings))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
