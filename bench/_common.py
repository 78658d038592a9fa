"""Bench plumbing: the fake upstream as a process, /proc readings, free ports, a lean HTTP/1.1 load client.

``python bench/_common.py fake PORT CHUNK_DELAY_S`` serves tests.fakes.upstream.FakeUpstream on
127.0.0.1:PORT with the bench script (32-frame OpenAI-format replies with usage; the Anthropic
route answers the same text), until SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = [
    "CLK_TCK",
    "ROOT",
    "LoadResult",
    "bench_script",
    "cpu_seconds",
    "free_port",
    "http_request",
    "open_streams",
    "raise_nofile",
    "rss_bytes",
    "run_load",
    "run_sessions",
    "wait_port",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# 1 role frame + 28 text frames + finish frame + usage frame + [DONE] = 32 SSE frames per reply.
TEXT_CHUNKS = 28


def bench_script(chunk_delay_s: float = 0.0, agent: bool = False):  # type: ignore[no-untyped-def]
    from tests.fakes.upstream import FakeUsage, Script

    if agent:
        # A coding agent's turn: 128 output tokens after a long prompt, mostly read from the cache.
        return Script(
            text=" ".join(f"word{i}" for i in range(128)),
            text_chunks=TEXT_CHUNKS,
            usage=FakeUsage(input_cache_hit=90_000, input_cache_miss=8_000, output=128),
            chunk_delay_s=chunk_delay_s,
        )
    text = " ".join(f"word{i}" for i in range(TEXT_CHUNKS * 4))
    return Script(
        text=text,
        text_chunks=TEXT_CHUNKS,
        usage=FakeUsage(input_cache_hit=256, input_cache_miss=1024, output=TEXT_CHUNKS * 4),
        chunk_delay_s=chunk_delay_s,
    )


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ---- the load client -----------------------------------------------------------------------------
# A bare asyncio protocol instead of aiohttp's client: it costs a fraction of the servers it measures,
# so the load generator sharing a core with the fake upstream stays out of the figures.


def http_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


_TERMINATOR = b"0\r\n\r\n"


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time; a chunked response ends at its 0-chunk."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.header_end = -1
        self.first_body_at = 0.0
        self.done: asyncio.Future[bytes] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.buf.clear()
        self.header_end = -1
        self.first_body_at = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.header_end < 0:
            self.header_end = buf.find(b"\r\n\r\n")
            if self.header_end < 0:
                return
            if b"chunked" not in buf[: self.header_end].lower():
                # Error answers carry a Content-Length; the bench only wants streams.
                if self.done is not None and not self.done.done():
                    self.done.set_exception(RuntimeError(bytes(buf[:200]).decode("latin-1")))
                return
        if not self.first_body_at and buf.find(b"data:", self.header_end) >= 0:
            self.first_body_at = time.perf_counter()
        if buf.endswith(_TERMINATOR) and self.done is not None and not self.done.done():
            self.done.set_result(bytes(buf))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-response"))
        if not self.closed.done():
            self.closed.set_result(None)


async def _connect(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, "127.0.0.1", port)
    return proto


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    ttfb_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    frames: int = 0  # SSE frames in one reply (checked on every reply)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def run_load(
    port: int, request: bytes, concurrency: int, *, duration_s: float, max_requests: int
) -> LoadResult:
    """``concurrency`` connections, each sending ``request`` back to back, until time or count runs out."""
    conns = [await _connect(port) for _ in range(concurrency)]
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration_s
    budget = [max_requests]

    async def worker(conn: _Conn) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                raw = await conn.send(request)
            except (RuntimeError, ConnectionError):
                result.errors += 1
                return
            t1 = time.perf_counter()
            frames = raw.count(b"data:")
            if not raw.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in raw:
                result.errors += 1
                continue
            result.frames = frames
            result.requests += 1
            result.ttfb_s.append(conn.first_body_at - t0)
            result.total_s.append(t1 - t0)

    await asyncio.gather(*(worker(c) for c in conns))
    result.elapsed_s = time.perf_counter() - started
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return result


async def run_sessions(
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: Callable[[int], Iterator[bytes]],
    concurrency: int,
    *,
    per_worker: int,
) -> LoadResult:
    """Connection ``i`` sends the first ``per_worker`` bodies of ``bodies(i)`` in order (its sessions).

    A fixed count, not a duration: every target then sees the same mix of prompt sizes however fast
    it is (a timed phase would stop a slow target's sessions at their short first turns).
    """
    conns = [await _connect(port) for _ in range(concurrency)]
    result = LoadResult()
    started = time.perf_counter()

    async def worker(i: int, conn: _Conn) -> None:
        stream = bodies(i)
        for _ in range(per_worker):
            request = http_request(port, path, next(stream), headers)
            t0 = time.perf_counter()
            try:
                raw = await conn.send(request)
            except (RuntimeError, ConnectionError) as exc:
                result.errors += 1
                print(f"  error: {str(exc)[:200]}", file=sys.stderr)
                return
            t1 = time.perf_counter()
            if not raw.startswith(b"HTTP/1.1 200") or (b"[DONE]" not in raw and b"message_stop" not in raw):
                result.errors += 1
                continue
            result.frames = raw.count(b"data:")
            result.requests += 1
            result.ttfb_s.append(conn.first_body_at - t0)
            result.total_s.append(t1 - t0)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    result.elapsed_s = time.perf_counter() - started
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return result


async def open_streams(port: int, request: bytes, n: int, *, timeout_s: float) -> list[_Conn]:
    """Open ``n`` streams and return once every one has its first body byte (caller aborts them)."""
    conns: list[_Conn] = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(_connect(port) for _ in range(min(100, n - i))))
    for c in conns:
        # Retrieve the outcome even when the caller aborts the stream before it ends.
        c.send(request).add_done_callback(lambda f: f.exception())
    deadline = time.perf_counter() + timeout_s
    while sum(1 for c in conns if c.first_body_at) < n:
        failed = [c for c in conns if c.done is not None and c.done.done()]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} streams failed to start")
        if time.perf_counter() > deadline:
            got = sum(1 for c in conns if c.first_body_at)
            raise TimeoutError(f"only {got} of {n} streams started")
        await asyncio.sleep(0.05)
    return conns


# ---- the fake upstream process -------------------------------------------------------------------


async def _serve_fake(port: int, chunk_delay_s: float, agent: bool = False) -> None:
    from aiohttp import web

    from tests.fakes.upstream import FakeUpstream

    fake = FakeUpstream(bench_script(chunk_delay_s, agent))
    # The fake keeps every request it saw for tests to inspect: a bench must not grow without end.
    fake.requests = _Forgetful()
    runner = web.AppRunner(fake.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


class _Forgetful(list):  # type: ignore[type-arg]
    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "fake":
        raise_nofile()
        asyncio.run(_serve_fake(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:] == ["agent"]))
    else:
        sys.exit("usage: python bench/_common.py fake PORT CHUNK_DELAY_S [agent]")
