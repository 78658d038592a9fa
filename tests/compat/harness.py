"""Running real coding clients as subprocesses against an in-process gateway and the agent upstream.

    async with compat_setup(redis, keyspace, tmp_path) as c:   # gateway + AgentUpstream + recorder
        run = await run_client([...], env=c.env(...), cwd=c.project, timeout=60)
        assert c.token in run.output

Clients are kept off the network: every proxy variable points at a local listener that refuses
every request (``ProxyTrap``, as good as a closed port, but it notes which hosts a client tried),
loopback exempt; each run gets its own HOME (and XDG dirs) under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis

from ledger.keys import Keyspace
from tests.compat.agent_upstream import READ_TRIGGER, AgentUpstream
from tests.gateway_harness import Gateway, running_gateway

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / ".clients"
NPM_BIN = CLIENTS / "npm" / "node_modules" / ".bin"
AIDER_VENV = CLIENTS / "aider-venv"

# The gateway's models file (tests/gateway_harness.MODELS_TOML): one model per upstream format.
MODEL_OF_FORMAT = {"openai": "gpt-test", "anthropic": "claude-test"}
FORMATS = tuple(MODEL_OF_FORMAT)

PROXY_NAMES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
# Enough credit for nothing: every client request gets the gateway's 402.
THIN_CREDIT_MICRO = 1_000


def client_binary(path: Path) -> str:
    if not path.exists():
        raise AssertionError(f"{path} is missing: run scripts/install-clients (./scripts/test does)")
    return str(path)


# ---- what clients sent to the gateway --------------------------------------------------------------


@dataclass
class ClientRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    status: int | None = None


class Recorder:
    """Records every request a client makes to the gateway (outermost middleware) and its status."""

    def __init__(self) -> None:
        self.requests: list[ClientRequest] = []

    def install(self, app: web.Application) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            raw = b""
            with contextlib.suppress(Exception):  # the gateway answers a body it cannot read itself
                raw = await request.read()  # aiohttp caches it: the handler reads it again
            try:
                body: Any = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = None
            entry = ClientRequest(
                request.method, request.path, request.query_string, dict(request.headers), body
            )
            self.requests.append(entry)
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                entry.status = exc.status
                raise
            entry.status = response.status
            return response

        app.middlewares.insert(0, record)

    def api_requests(self) -> list[ClientRequest]:
        return [r for r in self.requests if r.path.startswith("/v1/")]


# ---- the network, refused ----------------------------------------------------------------------


class ProxyTrap:
    """What every proxy variable points at: a local listener that refuses each request it gets.

    It answers nothing (reads the first line, closes), so a client trying the internet fails as
    against a closed port, and the test learns which hosts it tried (``CONNECT host:443``).
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> ProxyTrap:
        self._server = await asyncio.start_server(self._refuse, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 2)
        except (TimeoutError, ConnectionError):
            line = b""
        words = line.decode(errors="replace").split()
        # "CONNECT host:443 HTTP/1.1" or "GET http://host/path HTTP/1.1"; anything else (SOCKS) as is.
        self.attempts.append(
            words[1].split("/")[2]
            if len(words) > 1 and "://" in words[1]
            else (words[1] if len(words) > 1 else "non-HTTP connection")
        )
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    def env(self) -> dict[str, str]:
        names = PROXY_NAMES + tuple(n.lower() for n in PROXY_NAMES)
        return {
            **{name: self.url for name in names},
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }


# ---- running a client ------------------------------------------------------------------------------


@dataclass
class ClientRun:
    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    stopped_early: bool  # ``until`` appeared and the client was ended on purpose

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    @property
    def flat(self) -> str:
        """The output with its line wrapping undone (clients wrap long messages to the terminal)."""
        return " ".join(self.output.split())

    def describe(self) -> str:
        """For assertion messages: how it ended (first line, for the matrix) and its output's tail."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        last = lines[-1][:300] if lines else "(no output)"
        ended = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (
            f"{Path(self.argv[0]).name} {ended} after {self.seconds:.1f}s, last line: {last}\n"
            f"argv={self.argv}\n--- output tail ---\n{self.output[-3000:]}"
        )


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def run_client(
    argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 90.0, until: str | None = None
) -> ClientRun:
    """Run a client in its own process group; end the group on timeout, once ``until`` shows, and after."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=str(cwd),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    seen = asyncio.Event()

    async def pump(name: str, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while data := await stream.read(65536):
            chunks[name].append(data)
            if until is not None and until.encode() in b"".join(chunks["stdout"] + chunks["stderr"]):
                seen.set()

    pumps = [
        asyncio.create_task(pump("stdout", proc.stdout)),
        asyncio.create_task(pump("stderr", proc.stderr)),
    ]
    exited = asyncio.create_task(proc.wait())
    shown = asyncio.create_task(seen.wait())
    done, _ = await asyncio.wait({exited, shown}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    timed_out = not done
    stopped_early = shown in done and exited not in done
    shown.cancel()
    if proc.returncode is None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), 3)
        except TimeoutError:
            _kill_group(proc.pid, signal.SIGKILL)
            await exited
    _kill_group(proc.pid, signal.SIGKILL)  # helpers the client left behind in its group
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*pumps), 5)
    for task in pumps:
        task.cancel()
    return ClientRun(
        argv=argv,
        returncode=proc.returncode,
        stdout=b"".join(chunks["stdout"]).decode(errors="replace"),
        stderr=b"".join(chunks["stderr"]).decode(errors="replace"),
        seconds=time.monotonic() - started,
        timed_out=timed_out,
        stopped_early=stopped_early,
    )


# ---- one test's world ------------------------------------------------------------------------------


@dataclass
class Compat:
    gw: Gateway
    upstream: AgentUpstream
    recorder: Recorder
    trap: ProxyTrap
    tmp: Path
    key: str  # a funded key
    marker: str  # unique text of the upstream's plain answer
    token: str  # unique text in the file the tool round trip reads
    project: Path = field(init=False)
    notes: Path = field(init=False)

    def __post_init__(self) -> None:
        self.project = self.tmp / "project"
        self.project.mkdir(exist_ok=True)
        self.notes = self.project / "notes.txt"
        self.notes.write_text(f"The deploy token is {self.token}\n")
        self.upstream.answer = f"Hello from the fake upstream, marker {self.marker}."
        self.upstream.read_path = str(self.notes)

    @property
    def read_prompt(self) -> str:
        return (
            f"{READ_TRIGGER}: read the file {self.notes} with your file-reading tool and tell me the token."
        )

    async def thin_key(self) -> str:
        """A key whose account holds too little credit for any request (the gateway answers 402)."""
        account_id, _ = await self.gw.ledger.create_account("thin@example.com")
        await self.gw.ledger.credit(
            account_id, THIN_CREDIT_MICRO, reference=f"grant:{account_id}", source="grant"
        )
        return (await self.gw.ledger.create_key(account_id)).key

    def home(self, name: str = "home") -> Path:
        """A fresh HOME for one client run, with its XDG directories inside."""
        home = self.tmp / name
        for sub in (".config", ".local/share", ".cache", ".local/state", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return home

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local/state"),
            "TMPDIR": str(home / "tmp"),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "NO_COLOR": "1",
            "COLUMNS": "200",
            **self.trap.env(),
            **extra,
        }


@contextlib.asynccontextmanager
async def compat_setup(
    redis: Redis, keyspace: Keyspace, tmp_path: Path, *, extra_models: str = ""
) -> AsyncIterator[Compat]:
    recorder = Recorder()
    async with (
        ProxyTrap() as trap,
        AgentUpstream() as upstream,
        running_gateway(
            redis, keyspace, tmp_path, upstream, extra_models=extra_models, configure_app=recorder.install
        ) as gw,
    ):
        key = await gw.funded_key(100)
        yield Compat(
            gw=gw,
            upstream=upstream,
            recorder=recorder,
            trap=trap,
            tmp=tmp_path,
            key=key,
            marker=f"COMPAT-MARK-{secrets.token_hex(6)}",
            token=f"COMPAT-TOKEN-{secrets.token_hex(6)}",
        )
