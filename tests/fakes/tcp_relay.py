"""A TCP relay on loopback that a test can cut and restore: a Redis blip with real sockets."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpRelay"]


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.up = True
        self._replies = asyncio.Event()  # set: replies flow back; cleared: they wait (a slow Redis)
        self._replies.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until restore()."""
        self.up = False
        for w in list(self._pipes):
            w.transport.abort()
        self._pipes.clear()

    def restore(self) -> None:
        self.up = True

    def hold_replies(self) -> None:
        """Requests still reach the target and run there; their replies wait until release_replies()."""
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if gate is not None:
                        await gate.wait()
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, None), pipe(up_reader, writer, self._replies))
        self._pipes.discard(writer)
        self._pipes.discard(up_writer)
