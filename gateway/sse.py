"""Server-sent events: an incremental parser for upstream bytes and a frame encoder for clients.

The parser never copies more than one partial frame, so a stream costs memory in proportion to its
longest event, not its length. Comment lines (``: keep-alive``) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["DONE", "SSEEvent", "SSEParser", "event_of_block", "format_event", "format_json_event"]

DONE = b"[DONE]"


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: bytes


class SSEParser:
    """Feed raw bytes as they arrive; get back the events completed by them."""

    __slots__ = ("_buf", "_data", "_event")

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        held = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                # Maybe the first half of a CRLF cut between two chunks: wait for the next byte.
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[SSEEvent] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if not line:
                if self._data:
                    out.append(SSEEvent(self._event, b"\n".join(self._data)))
                self._event = None
                self._data = []
                continue
            if line[:1] == b":":
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value)
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")
        self._buf = buf[start:] + held
        return out

    @property
    def idle(self) -> bool:
        """Between events: nothing of a next one read yet."""
        return not self._buf and not self._data and self._event is None

    def close(self) -> list[SSEEvent]:
        """Flush an event left without its blank line when the stream ends."""
        out: list[SSEEvent] = []
        if self._buf:
            out = self.feed(b"\n")
        if self._data:
            out.append(SSEEvent(self._event, b"\n".join(self._data)))
            self._data = []
        return out


def event_of_block(block: bytes) -> SSEEvent | None:
    """The event of one whole block (its lines without the blank line ending it, ``\n`` line ends):
    what SSEParser yields for it, None for a comment-only block."""
    event: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[:1] == b":":
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            event = value.decode("utf-8", "replace")
    return SSEEvent(event, b"\n".join(data)) if data else None


def format_event(data: bytes, event: str | None = None) -> bytes:
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def format_json_event(obj: Any, event: str | None = None) -> bytes:
    return format_event(orjson.dumps(obj), event)
