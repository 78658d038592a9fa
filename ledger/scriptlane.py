"""EVALSHA on one pipelined connection: the ledger's scripts on the request path without redis-py's
per-command machinery.

Every request makes two script calls (reserve, settle). Through redis-py each costs ~80-90 us of CPU
(connection pool, retry wrapper, timeouts, a reply parser reading line by line); here ~15 us: calls
from every request share one connection, are written at once when none is waiting for its reply
(one request at a time) or else together once per loop iteration, and their replies are parsed as
they arrive, in the transport's own callback (no reader task to wake), in order. ``start`` sends a
call without waiting (the proxy's settlement: its reply is handled in a callback, no task a request).

The connection is made by redis-py itself (``pool.make_connection()``: TLS, AUTH, HELLO, SELECT as the
URL says; one try, without the pool's retries), then its transport is taken over. The lane is an
optimisation, never a second behaviour: a lost connection, a timeout or NOSCRIPT raises
``LaneUnavailable`` and the caller runs the same call through redis-py, whose reload, retries,
reconnection and exceptions apply as before. The scripts are idempotent on their ids, so a call the
lane may have sent before its connection broke is safe to send again (redis-py's own retry does the
same). Any other error reply is raised as redis-py would raise it (a script that failed is not run
twice). One case is not covered: a call the lane gave up on after its timeout (Redis stalled for 10
s) may still run after redis-py's re-run; for reserve, a late hold is then released by the worker's
stale sweep after its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError


def _parse_error(response: str) -> RedisError:
    """redis-py's own mapping of an error reply to its exception class (BusyLoadingError, ...)."""
    try:
        from redis._parsers.base import BaseParser
    except ImportError:  # a redis-py without it: a plain ResponseError
        return ResponseError(response)
    error: RedisError = BaseParser.parse_error(response)  # type: ignore[no-untyped-call]
    return error


__all__ = ["LaneUnavailable", "ScriptLane"]

_CRLF = b"\r\n"


class LaneUnavailable(Exception):
    """The lane could not answer this call: run it through redis-py."""


class _Incomplete(Exception):
    pass


class ScriptLane:
    def __init__(self, pool: Any, *, timeout_s: float = 10.0) -> None:
        self._pool = pool  # redis-py's connection pool: only its make_connection() is used
        self._timeout_s = timeout_s
        self._conn: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._protocol: _LaneProtocol | None = None
        self._buf = b""  # the start of a reply not wholly read yet
        self._connecting: asyncio.Future[None] | None = None
        # Calls written and not answered yet, in order: (future, monotonic time sent).
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._retry_at = 0.0  # after a failed connect, calls go to redis-py until then

    async def evalsha(self, sha: str, key: str, args: list[str]) -> Any:
        if self._closed:
            raise LaneUnavailable("closed")
        if self._writer is None:
            if time.monotonic() < self._retry_at:
                raise LaneUnavailable("reconnecting later")
            await self._connect()
        future = self.start(sha, key, args)
        if future is None:
            raise LaneUnavailable("not connected")
        return await future

    def start(self, sha: str, key: str, args: list[str]) -> asyncio.Future[Any] | None:
        """The call written (or planned for this loop iteration) without waiting: its reply's future,
        which fails with LaneUnavailable when the lane cannot answer; None when the lane is not
        connected now (then ``evalsha`` or redis-py)."""
        writer = self._writer
        if writer is None or self._closed:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        in_flight = bool(self._pending)
        self._out.append(_pack(("EVALSHA", sha, "1", key, *args)))
        self._pending.append((future, time.monotonic()))  # (before a write that may fail them all)
        if in_flight:
            if len(self._out) == 1:
                loop.call_soon(self._flush)  # others are in flight: calls made meanwhile go together
        else:
            self._flush()  # the only one: nothing to wait for
        if self._watchdog is None:
            self._watchdog = loop.call_later(1.0, self._watch)
        return future

    async def aclose(self) -> None:
        self._closed = True
        self._broken(LaneUnavailable("closed"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await asyncio.sleep(0)  # a plain transport's close calls back on the next iteration

    # ----- connection ----------------------------------------------------------------------------
    async def _connect(self) -> None:
        if self._closed:
            raise LaneUnavailable("closed")
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        conn = None
        try:
            # One try: when Redis is not there, redis-py's own call (and its retries) answers.
            pool = self._pool
            conn = pool.connection_class(**{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)})
            await conn.connect()
            reader, writer = conn._reader, conn._writer
            if reader is None or writer is None:
                raise LaneUnavailable("no streams")
            if self._closed:
                raise LaneUnavailable("closed")
            if reader.at_eof() or getattr(reader, "_buffer", b""):
                raise LaneUnavailable("unread bytes after the handshake")
            # Replies are read by our callback from here on; redis-py's reader sees nothing more.
            protocol = _LaneProtocol(self)
            writer.transport.set_protocol(protocol)
            self._conn, self._writer, self._protocol, self._buf = conn, writer, protocol, b""
        except BaseException as exc:
            if conn is not None and conn is not self._conn:
                _drop(conn)
            if not isinstance(exc, Exception):
                raise  # cancelled
            # Redis is not there: redis-py answers (its retries, its errors) for a second.
            self._retry_at = time.monotonic() + 1.0
            raise LaneUnavailable(type(exc).__name__) from None
        finally:
            self._connecting.set_result(None)
            self._connecting = None

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._writer is None or not out:
            return
        try:
            self._writer.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception:
            self._broken(LaneUnavailable("write failed"))

    def _received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        try:
            while pos < len(buf):
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                if isinstance(value, _Push):
                    continue  # out of band (RESP3 push): not a reply to any call
                if not self._pending:
                    self._broken(LaneUnavailable("unexpected reply"))
                    return
                future, _ = self._pending.popleft()
                if future.done():
                    continue  # its caller went away; the reply is consumed all the same
                if isinstance(value, _ErrorReply):
                    error: Exception
                    if value.message.startswith("NOSCRIPT"):
                        error = LaneUnavailable("NOSCRIPT")  # redis-py reloads it
                    else:
                        try:
                            error = _parse_error(value.message)
                        except Exception:  # (its caller is answered whatever happens here)
                            error = ResponseError(value.message)
                    future.set_exception(error)
                else:
                    future.set_result(value)
        except Exception:
            self._broken(LaneUnavailable("read failed"))
            return
        self._buf = buf[pos:]

    def _lost(self, protocol: _LaneProtocol) -> None:
        if protocol is self._protocol:
            self._broken(LaneUnavailable("connection closed"))

    def _watch(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        if time.monotonic() - self._pending[0][1] > self._timeout_s:
            self._broken(LaneUnavailable("timeout"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(1.0, self._watch)

    def _broken(self, exc: LaneUnavailable) -> None:
        """Drop the connection; every call waiting on it is answered by redis-py instead."""
        writer, self._writer = self._writer, None
        conn, self._conn = self._conn, None
        self._out = []
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        if conn is not None:
            conn._reader = conn._writer = None  # closed above; redis-py must not reuse them
        self._protocol, self._buf = None, b""
        self._fail(exc)

    def _fail(self, exc: LaneUnavailable) -> None:
        pending, self._pending = self._pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)


class _LaneProtocol(asyncio.Protocol):
    """The lane's connection, once redis-py's handshake is done: bytes go straight to the lane."""

    def __init__(self, lane: ScriptLane) -> None:
        self._lane = lane

    def data_received(self, data: bytes) -> None:
        if self._lane._protocol is self:
            self._lane._received(data)

    def eof_received(self) -> bool:
        self._lane._lost(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lane._lost(self)


def _drop(conn: Any) -> None:
    writer = getattr(conn, "_writer", None)
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()
    conn._reader = conn._writer = None


def _pack(parts: tuple[str, ...]) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Push:
    __slots__ = ()


class _ErrorReply:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 reply at ``pos``: (value, position after it); strings decoded as UTF-8."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos : pos + 1]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == b"$" or kind == b"=" or kind == b"!":  # bulk string, verbatim string, bulk error
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        data = buf[pos : pos + size].decode("utf-8", "replace")
        if kind == b"=":
            data = data[4:]  # "txt:" prefix
        value: Any = _ErrorReply(data) if kind == b"!" else data
        return value, pos + size + 2
    if kind == b"*" or kind == b"~" or kind == b">":  # array, set, push
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return (_Push() if kind == b">" else items), pos
    if kind == b":":
        return int(line), pos
    if kind == b"+":
        return line.decode("utf-8", "replace"), pos
    if kind == b"-":
        return _ErrorReply(line.decode("utf-8", "replace")), pos
    if kind == b"_":
        return None, pos
    if kind == b",":
        return float(line), pos
    if kind == b"#":
        return line == b"t", pos
    if kind == b"(":
        return int(line), pos
    if kind == b"%":  # map
        count = int(line)
        mapping = {}
        for _ in range(count):
            k, pos = _parse(buf, pos)
            v, pos = _parse(buf, pos)
            mapping[k] = v
        return mapping, pos
    raise ValueError("unknown RESP type")
