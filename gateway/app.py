"""The application factory: one function builds the app from Settings; resources live in cleanup_ctx."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from ledger.connection import log_redis_problems
from ledger.epoch import LedgerState, history_in, open_ledger
from ledger.journal import JournalWorker
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.redis_client import AnyRedis
from ledger.redis_client import connect as connect_redis
from ledger.spool import Spool, spool_dir
from ledger.store import Store

from . import tokens
from .api import api_routes
from .appkeys import (
    AUTH_THROTTLE,
    BACKGROUND,
    COUNT_SLOTS,
    DEMO,
    HTTP,
    LEDGER,
    METRICS,
    PROXY,
    REDIS,
    REGISTRY,
    SETTINGS,
    STORE,
)
from .demo import demo_routes
from .durability import keep_settlements, shutdown_budget
from .limits import AuthThrottle, KeySlots
from .metrics import Metrics
from .middlewares import error_middleware
from .models import Registry, load_registry
from .payments import setup_payments
from .proxy import Proxy
from .server import quiet_aiohttp_loggers
from .settings import Settings
from .web import setup_web

__all__ = ["create_app"]

log = logging.getLogger("gateway.app")

HEARTBEAT_S = 60.0


def create_app(
    settings: Settings,
    *,
    redis: AnyRedis | None = None,
    registry: Registry | None = None,
    clock: Callable[[], float] | None = None,
) -> web.Application:
    """Build the app. Tests pass their own Redis client (own key prefix) and a registry of fakes."""
    quiet_aiohttp_loggers()  # aiohttp's own log records lose anything that could quote a request
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[REGISTRY] = registry or _registry(settings)
    app[METRICS] = Metrics()
    app[BACKGROUND] = set()
    app[COUNT_SLOTS] = KeySlots(settings.count_tokens_concurrency)
    internal_token = secrets.token_urlsafe(24)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        tokens.load_encoding()  # once, here: never on the request path
        own_redis = redis is None
        embedded = None
        client: AnyRedis
        if redis is not None:
            client = redis
        elif settings.redis_url:
            # A single server or any node of a Redis Cluster (detected): ledger/redis_client.py.
            client = await connect_redis(settings.redis_url)  # 64 in flight at most; the rest wait
        else:
            from .embedded import EmbeddedRedis

            embedded = EmbeddedRedis(settings.database_path.parent / "embedded-redis.url")
            client = Redis.from_url(embedded.start(), decode_responses=True)
        app[REDIS] = client
        keyspace = Keyspace(prefix=settings.ledger_prefix, shards=settings.ledger_shards)
        app[LEDGER] = Ledger(
            client,
            keyspace,
            done_ttl_s=settings.ledger_done_ttl_s,
            script_lane=True,
            **({"clock": clock} if clock else {}),
        )
        app[AUTH_THROTTLE] = AuthThrottle(
            client,
            keyspace,
            app[METRICS],
            limit=settings.auth_failure_limit,
            window_s=settings.auth_failure_window_s,
            forwarded_hops=settings.forwarded_hops,
        )
        await app[LEDGER].load_scripts()
        app[STORE] = Store(settings.history_target)
        if embedded is None and own_redis:
            await log_redis_problems(client)
        if embedded is None and await open_ledger(app[LEDGER], history_in(app[STORE])) is LedgerState.LOST:
            log.error(
                "the ledger's Redis has lost its data (no epoch marker): requests get 503 until an "
                "operator runs `python -m ledger rebuild`"
            )
        worker_stop = asyncio.Event()
        worker_task = None
        if embedded is not None:
            from .embedded import bootstrap_demo

            await asyncio.to_thread(app[STORE].migrate)
            worker = JournalWorker(client, keyspace, app[STORE], ledger=app[LEDGER])
            worker_task = asyncio.get_running_loop().create_task(worker.run(worker_stop))
            app[DEMO] = await bootstrap_demo(app[LEDGER], app[STORE])
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        http = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False)
        app[HTTP] = http
        proxy = Proxy(settings, app[REGISTRY], app[LEDGER], http, app[METRICS], app[BACKGROUND])
        proxy.internal_token = internal_token
        spool = Spool(spool_dir(settings.database_path))
        await asyncio.to_thread(spool.open)
        proxy.spool = spool
        app[PROXY] = proxy
        loop = asyncio.get_running_loop()
        chores = [
            loop.create_task(_heartbeat(proxy, app[LEDGER])),
            loop.create_task(
                keep_settlements(proxy, app[LEDGER], spool, app[METRICS], progress_every_s=settings.progress_every_s)
            ),
        ]
        try:
            yield
        finally:
            for chore in chores:
                chore.cancel()
            await _drain(app, proxy)
            if spool.pending:
                # One last try; what is left stays on disk for the next process (or the worker).
                await _replay_briefly(spool, app[LEDGER])
            spool.close()
            await http.close()
            if worker_task is not None:
                worker_stop.set()
                await worker_task
            app[STORE].close()
            await app[LEDGER].aclose()
            if own_redis:
                await client.aclose()
            if embedded is not None:
                embedded.stop()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_routes(api_routes())
    app.router.add_routes(demo_routes(lambda: internal_token))
    setup_web(app)
    setup_payments(app)
    return app


def _registry(settings: Settings) -> Registry:
    registry = load_registry(settings.models_file, settings.provider_env)
    if settings.embedded and "demo" in registry.models:
        # No provider key is set on the embedded default: Claude Code's own model names (its default
        # claude-opus-..., sonnet, haiku) answer with the local demo model, so it works out of the box.
        registry = registry.with_aliases_to("demo")
    return registry


async def _heartbeat(proxy: Proxy, ledger: Ledger) -> None:
    """Keep live reservations from being swept as abandoned while their streams run, and the holds
    of spooled settlements while they wait for Redis."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            held = [(acct, req) for req, acct in proxy.live.items()]
            if proxy.spool is not None:
                held += [(s.account_id, s.request_id) for s in proxy.spool.pending.values()]
            await ledger.extend(held)
        except Exception as exc:
            log.warning("reservation heartbeat failed: %s", type(exc).__name__)


async def _on_shutdown(app: web.Application) -> None:
    # SHUTDOWN_GRACE_S counts from here, once: in-flight streams may run until its last margin;
    # aiohttp then cancels what is left (each cancelled request settles in its finally), and _drain
    # spools whatever settlement has not reached Redis by the deadline.
    proxy = app.get(PROXY)
    if proxy is None:
        return
    proxy.shutting_down = True
    loop = asyncio.get_running_loop()
    grace = app[SETTINGS].shutdown_grace_s
    margin, _ = shutdown_budget(grace)
    proxy.shutdown_deadline = loop.time() + grace
    while proxy.live and loop.time() < proxy.shutdown_deadline - margin:
        await asyncio.sleep(0.05)


async def _drain(app: web.Application, proxy: Proxy) -> None:
    loop = asyncio.get_running_loop()
    deadline = proxy.shutdown_deadline or loop.time() + app[SETTINGS].shutdown_grace_s
    background: set[asyncio.Future[Any]] = app[BACKGROUND]
    # Again while new ones appear: a settlement the script lane could not answer goes on in a task
    # started from its callback (even in the pass where the deadline comes). Past the deadline each
    # round cancels what is left; a cancelled settlement spools itself and starts nothing new.
    while background:
        _, late = await asyncio.wait(list(background), timeout=max(0.0, deadline - loop.time() - 0.2))
        if late:
            for task in late:
                task.cancel()
            _, stuck = await asyncio.wait(late, timeout=1.0)
            if stuck:
                break


async def _replay_briefly(spool: Spool, ledger: Ledger) -> None:
    try:
        await asyncio.wait_for(spool.replay(ledger), timeout=0.5)
    except Exception as exc:
        log.warning("spool replay at shutdown stopped: %s", type(exc).__name__)
