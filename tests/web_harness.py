"""A running gateway with its web side on loopback, a local OIDC issuer, and a cookie-keeping client.

    async with running_web(redis_client, keyspace, tmp_path) as w:
        browser = w.browser()
        await w.sign_in(browser)                      # through the FakeIssuer, like a browser would
        token = await w.csrf(browser)
        r = await browser.post("/api/keys", headers={"X-CSRF-Token": token})

Every response body any browser of ``w`` received is kept in ``w.bodies`` (the "shown once" tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.appkeys import LEDGER
from gateway.models import load_registry
from gateway.server import GatewayRunner
from gateway.settings import DEFAULT_MODELS_FILE, Settings
from ledger.journal import JournalWorker
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.store import Store
from tests.fakes.oidc import FakeIssuer, FakeUser
from tests.history import history_dump, history_url

SESSION_SECRET = b"web-tests-session-secret-0123456789abcdef"


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


@dataclass
class Browser:
    """An aiohttp client with its own cookie jar; records every body it receives."""

    base: str
    session: aiohttp.ClientSession
    bodies: list[bytes]

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        url = path if path.startswith("http") else self.base + path
        kwargs.setdefault("allow_redirects", False)
        async with self.session.request(method, url, **kwargs) as r:
            body = await r.read()
            self.bodies.append(body)
            return Reply(r.status, r.headers, body)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("POST", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("DELETE", path, **kwargs)

    def cookie(self, name: str = "cp_session") -> str | None:
        for c in self.session.cookie_jar:
            if c.key == name:
                return c.value
        return None


@dataclass
class WebGateway:
    url: str
    app: web.Application
    ledger: Ledger
    store: Store
    worker: JournalWorker
    issuer: FakeIssuer
    settings: Settings
    bodies: list[bytes] = field(default_factory=list)
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    def browser(self) -> Browser:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self._sessions.append(session)
        return Browser(self.url, session, self.bodies)

    async def begin_sign_in(self, browser: Browser) -> str:
        """Start a sign-in and follow the issuer's redirect; returns our callback URL (not yet visited)."""
        r = await browser.get("/auth/google")
        assert r.status == 303, r.text
        location = r.headers["Location"]
        assert location.startswith(self.issuer.url + "/authorize?")
        r = await browser.get(location)
        assert r.status == 302, r.text
        callback = str(r.headers["Location"])
        assert callback.startswith(self.url + "/auth/google/callback?")
        return callback

    async def sign_in(self, browser: Browser) -> Reply:
        return await browser.get(await self.begin_sign_in(browser))

    async def csrf(self, browser: Browser) -> str:
        r = await browser.get("/api/account")
        assert r.status == 200, r.text
        token: str = r.json()["csrf_token"]
        return token

    async def drain(self) -> None:
        while await self.worker.drain_once():
            pass

    async def close(self) -> None:
        for s in self._sessions:
            await s.close()


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def running_web(
    redis: Redis,
    keyspace: Keyspace,
    tmp_path: Path,
    *,
    user: FakeUser | None = None,
    clock: Callable[[], float] | None = None,
    issuer_auto_approve: bool = True,
    **overrides: Any,
) -> AsyncIterator[WebGateway]:
    """The shipped model registry (the ``demo`` model is served by the gateway itself)."""
    async with FakeIssuer(user=user or FakeUser(), auto_approve=issuer_auto_approve) as issuer:
        sock = _free_socket()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings(
            redis_url="redis://injected",
            database_path=tmp_path / "gateway.sqlite3",
            database_url=history_url(tmp_path),
            ledger_prefix=keyspace.prefix,
            ledger_shards=keyspace.shards,
            session_secret=SESSION_SECRET,
            public_base_url=url,
            google_client_id=issuer.client_id,
            google_client_secret=issuer.client_secret,
            oidc_issuer=issuer.url,
            shutdown_grace_s=2.0,
        )
        settings = replace(settings, **overrides)
        store = Store(settings.history_target)
        await asyncio.to_thread(store.migrate)
        registry = load_registry(DEFAULT_MODELS_FILE, {})
        app = create_app(settings, redis=redis, registry=registry, clock=clock)
        runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        ledger = app[LEDGER]
        worker = JournalWorker(redis, keyspace, store, ledger=ledger)
        gw = WebGateway(url, app, ledger, store, worker, issuer, settings)
        try:
            yield gw
        finally:
            await gw.close()
            await runner.cleanup()
            store.close()


async def settle_request(
    ledger: Ledger,
    account_id: str,
    key_id: str,
    *,
    model: str = "demo",
    hit: int = 0,
    miss: int = 100,
    out: int = 50,
    charge_micro: int = 1_000,
    status: str = "ok",
) -> str:
    """One metered request through the ledger, shaped like gateway/proxy.py's settlement."""
    from ledger.keys import new_request_id, shard_of
    from ledger.money import iso_ms

    started = ledger.now_ms()
    request_id = new_request_id(shard_of(account_id), started)
    await ledger.reserve(account_id, request_id, charge_micro, key_id=key_id)
    metering = {
        "request_id": request_id,
        "key_id": key_id,
        "model": model,
        "provider": "demo",
        "upstream_model": model,
        "input_cache_hit_tokens": hit,
        "input_cache_miss_tokens": miss,
        "cache_write_tokens": 0,
        "output_tokens": out,
        "status": status,
        "estimated": False,
        "started_at": iso_ms(started),
        "finished_at": iso_ms(ledger.now_ms()),
        "latency_ms": 0,
    }
    await ledger.settle(account_id, request_id, charge_micro, metering=metering)
    return request_id


async def redis_dump(redis: Redis, prefix: str) -> list[str]:
    """Every key name and every value under the prefix, as strings (stream entries included)."""
    out: list[str] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        out.append(key)
        kind = await redis.type(key)
        if kind == "string":
            out.append(str(await redis.get(key)))
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            out += list(await redis.lrange(key, 0, -1))
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                out.append(entry_id)
                for k, v in fields.items():
                    out += [k, v]
    return out


def sqlite_dump(target: str | Path) -> list[str]:
    """Every value of every row of every table of the history (either engine), as strings."""
    return history_dump(target)
