"""A deployment like production on loopback: a redis-server of its own, `python -m gateway serve` and
`python -m gateway worker` as real processes (real signals), the fake upstream in the test's loop.

    async with deployment(tmp_path, fake, aof=True) as d:
        d.start_web(); d.start_worker(); await d.ready()
        key = await d.funded_key(10)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from ledger.connection import redis_client
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.reconcile import reconcile
from ledger.store import Store
from tests.fakes.upstream import FakeUpstream
from tests.gateway_harness import MODELS_TOML, UPSTREAM_KEY

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on its own port and directory; kill it, start it again (empty or from its AOF)."""

    def __init__(self, directory: Path, *, aof: bool, policy: str = "noeviction") -> None:
        self.dir = directory
        self.aof = aof
        self.policy = policy
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--maxmemory-policy", self.policy, "--daemonize", "no"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def wipe(self) -> None:
        """What a lost volume leaves: nothing."""
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    async def exited(self, timeout: float) -> int | None:
        """Its exit status, waiting without blocking the loop (the fake upstream runs on it)."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.popen.poll()

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        except FileNotFoundError:
            return ""


@dataclass
class Deployment:
    tmp: Path
    redis: RedisServer
    env: dict[str, str]
    keyspace: Keyspace
    ledger: Ledger
    http: aiohttp.ClientSession
    web_port: int
    procs: list[Proc] = field(default_factory=list)
    web: Proc | None = None
    worker: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def db(self) -> Path:
        return self.tmp / "var" / "gateway.sqlite3"

    def _spawn(self, name: str, *args: str, **extra: str) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        popen = subprocess.Popen(
            [sys.executable, *args],
            env={**self.env, **extra},
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_web(self, **extra: str) -> Proc:
        self.web = self._spawn("web", "-m", "gateway", "serve", **extra)
        return self.web

    def start_worker(self, **extra: str) -> Proc:
        self.worker = self._spawn("worker", "-m", "gateway", "worker", **extra)
        return self.worker

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(self.url + "/readyz") as r:
                    if r.status == 200:
                        return
            assert self.web is not None and self.web.popen.poll() is None, self.web.tail() if self.web else ""
            await asyncio.sleep(0.1)
        raise AssertionError("the gateway never became ready\n" + (self.web.tail() if self.web else ""))

    async def funded_key(self, units: int) -> tuple[str, str]:
        account, _ = await self.ledger.create_account("ops@example.com")
        await self.ledger.credit(account, units * 1_000_000, reference=f"grant:{account}", source="grant")
        return account, (await self.ledger.create_key(account)).key

    def store(self) -> Store:
        return Store(str(self.db))

    async def books(self, account: str, funds_micro: int, answered: list[str]) -> list[dict[str, Any]]:
        """Reconcile green in both stores, every answered request metered exactly once with its
        charge, nothing held: the metering rows."""
        store = self.store()
        try:
            report = await reconcile(self.ledger, store)
            assert report.ok, report.problems
            rows = [dict(r) for r in store.query("SELECT * FROM metering WHERE account_id = ?", (account,))]
        finally:
            store.close()
        assert sorted(r["request_id"] for r in rows) == sorted(answered)
        info = await self.ledger.account(account)
        assert info is not None
        assert (info.reserved, info.consumed) == (0, sum(r["charge_micro"] for r in rows))
        bal = await self.ledger.balance(account)
        assert bal.available_micro == funds_micro - info.consumed
        return rows

    async def metered(self, n: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            store = self.store()
            try:
                count = int(store.query("SELECT count(*) FROM metering")[0][0])
            finally:
                store.close()
            if count >= n:
                return count
            await asyncio.sleep(0.1)
        return count


@contextlib.asynccontextmanager
async def deployment(tmp: Path, fake: FakeUpstream, *, aof: bool, **env: str) -> AsyncIterator[Deployment]:
    redis = RedisServer(tmp / "redis", aof=aof)
    redis.start()
    models = tmp / "models.toml"
    models.write_text(MODELS_TOML.format(openai=fake.openai_base_url, anthropic=fake.anthropic_base_url))
    prefix = "cp"
    web_port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "LEDGER_", "DATABASE_"))}
    full_env = {
        **base,
        "REDIS_URL": redis.url,
        "SESSION_SECRET": "s" * 40,
        "DATABASE_PATH": str(tmp / "var" / "gateway.sqlite3"),
        "MODELS_FILE": str(models),
        "FAKE_OPENAI_KEY": UPSTREAM_KEY,
        "FAKE_ANTHROPIC_KEY": UPSTREAM_KEY,
        "HOST": "127.0.0.1",
        "PORT": str(web_port),
        "LEDGER_PREFIX": prefix,
        "LEDGER_SHARDS": "4",
        "LEDGER_ACTOR": "ops-test",
        "PROGRESS_EVERY_S": "0.5",
        "UPSTREAM_IDLE_TIMEOUT_S": "10",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    (tmp / "var").mkdir(parents=True, exist_ok=True)
    store = Store(full_env["DATABASE_PATH"])
    store.migrate()  # the release phase
    store.close()
    keyspace = Keyspace(prefix=prefix, shards=4)
    client: Redis = redis_client(redis.url)
    d = None
    try:
        async with aiohttp.ClientSession() as http:
            d = Deployment(tmp, redis, full_env, keyspace, Ledger(client, keyspace), http, web_port)
            yield d
    finally:
        if d is not None:
            for p in d.procs:
                if p.popen.poll() is None:
                    p.signal(signal.SIGKILL)
                    p.popen.wait()
        await client.aclose()
        redis.kill()
