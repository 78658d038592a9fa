"""A running gateway on loopback for end-to-end tests: real HTTP, real Redis (or fakeredis), fake upstreams.

    async with running_gateway(redis_client, keyspace, tmp_path, fake) as gw:
        key = await gw.funded_key(100)            # an account with 100 currency units, and its key
        r = await gw.http.post(gw.url + "/v1/chat/completions", ...)
        rows = await gw.metering()                # drains the journal into SQLite first
"""

from __future__ import annotations

import asyncio
import contextlib
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
from gateway.settings import Settings
from ledger.journal import JournalWorker
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.reconcile import reconcile
from ledger.store import Store
from tests.fakes.upstream import FakeUpstream
from tests.history import history_url

MODELS_TOML = """
currency = "THB"

[providers.fake-openai]
base_url = "{openai}"
format = "openai"
api_key_env = "FAKE_OPENAI_KEY"

[providers.fake-anthropic]
base_url = "{anthropic}"
format = "anthropic"
api_key_env = "FAKE_ANTHROPIC_KEY"

[models."gpt-test"]
provider = "fake-openai"
upstream_model = "gpt-test"
price_input_cache_hit = "1.5"
price_input_cache_miss = "3"
price_output = "12"
max_output_tokens = 4096

[models."deepseek-test"]
provider = "fake-openai"
upstream_model = "deepseek-upstream"
price_input_cache_hit = "0.5"
price_input_cache_miss = "2"
price_output = "8"
max_output_tokens = 8192

[models."claude-test"]
provider = "fake-anthropic"
upstream_model = "claude-upstream"
price_input_cache_hit = "3"
price_input_cache_miss = "30"
price_input_cache_write = "37.5"
price_output = "150"
max_output_tokens = 8192
"""

UPSTREAM_KEY = "sk-upstream-test"


@dataclass
class Gateway:
    url: str
    app: web.Application
    ledger: Ledger
    store: Store
    worker: JournalWorker
    http: aiohttp.ClientSession
    settings: Settings
    accounts: list[str] = field(default_factory=list)

    async def funded_key(self, amount_units: int | None = 100, *, email: str = "dev@example.com") -> str:
        account_id, _ = await self.ledger.create_account(email)
        self.accounts.append(account_id)
        if amount_units:
            await self.ledger.credit(
                account_id, amount_units * 1_000_000, reference=f"test-grant:{account_id}", source="grant"
            )
        return (await self.ledger.create_key(account_id)).key

    async def account_of(self, key: str) -> str:
        ref = await self.ledger.lookup_key(key)
        assert ref is not None
        return ref.account_id

    async def drain(self) -> None:
        await self.worker.drain_once()

    async def metering(self, account_id: str | None = None) -> list[dict[str, Any]]:
        await self.drain()
        sql = "SELECT * FROM metering" + (" WHERE account_id = ?" if account_id else "") + " ORDER BY started_at"
        rows = await asyncio.to_thread(self.store.query, sql, (account_id,) if account_id else ())
        return [dict(r) for r in rows]

    async def settled(self, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least n metering rows exist (settlement runs right after the response)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rows = await self.metering()
            if len(rows) >= n or asyncio.get_running_loop().time() > deadline:
                return rows
            await asyncio.sleep(0.02)

    async def reconcile_ok(self) -> None:
        report = await reconcile(self.ledger, self.store)
        assert report.ok, report.problems


@contextlib.asynccontextmanager
async def running_gateway(
    redis: Redis,
    keyspace: Keyspace,
    tmp_path: Path,
    fake: FakeUpstream,
    *,
    extra_models: str = "",
    configure_app: Callable[[web.Application], None] | None = None,
    **overrides: Any,
) -> AsyncIterator[Gateway]:
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        MODELS_TOML.format(openai=fake.openai_base_url, anthropic=fake.anthropic_base_url) + extra_models
    )
    env = {"FAKE_OPENAI_KEY": UPSTREAM_KEY, "FAKE_ANTHROPIC_KEY": UPSTREAM_KEY}
    settings = Settings(
        redis_url="redis://injected",
        database_path=tmp_path / "gateway.sqlite3",
        database_url=history_url(tmp_path),
        models_file=models_file,
        ledger_prefix=keyspace.prefix,
        ledger_shards=keyspace.shards,
        provider_env=env,
        upstream_connect_timeout_s=2.0,
        upstream_idle_timeout_s=2.0,
        shutdown_grace_s=2.0,
    )
    settings = replace(settings, **overrides)
    registry = load_registry(models_file, env)
    store = Store(settings.history_target)
    await asyncio.to_thread(store.migrate)
    app = create_app(settings, redis=redis, registry=registry)
    if configure_app is not None:
        configure_app(app)  # e.g. a recording middleware, before the app freezes
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    ledger = app[LEDGER]
    worker = JournalWorker(redis, keyspace, store, ledger=ledger)
    async with aiohttp.ClientSession() as http:
        gw = Gateway(f"http://127.0.0.1:{port}", app, ledger, store, worker, http, settings)
        try:
            yield gw
        finally:
            await runner.cleanup()
            store.close()
