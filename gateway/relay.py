"""Streaming an upstream's answer to the client.

Passthrough (the upstream speaks the client's format): bytes go out as they arrive and are parsed on
the side for usage; nothing is re-encoded. Translated: each upstream event is parsed once and fed to
the route's translator, which emits the client's events. Either way the exchange learns its usage
and how the stream ended; the proxy settles afterwards.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from .sse import DONE, SSEEvent, SSEParser, event_of_block, format_json_event

if TYPE_CHECKING:
    from .exchange import Exchange
    from .formats import StreamTranslator

__all__ = ["SSE_HEADERS", "BillingEvents", "echo_model", "relay_stream"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@functools.lru_cache(maxsize=1024)
def _model_patterns(up_name: str, client_name: str) -> tuple[bytes, bytes, bytes, bytes]:
    # Built once per model pair, not per chunk: encoding them on every chunk cost ~45 us a request.
    up_b = orjson.dumps(up_name)
    cl_b = orjson.dumps(client_name)
    return b'"model":' + up_b, b'"model":' + cl_b, b'"model": ' + up_b, b'"model": ' + cl_b


def echo_model(data: bytes, up_name: str, client_name: str) -> bytes:
    """Put the client's model name back where the upstream wrote its own, without re-encoding."""
    if up_name == client_name:
        return data
    tight, tight_to, spaced, spaced_to = _model_patterns(up_name, client_name)
    return data.replace(tight, tight_to).replace(spaced, spaced_to)


def _in_stream_error(upstream_fmt: str, event: str, obj: dict[str, Any]) -> tuple[str, str] | None:
    """An error the upstream reported inside its stream, as (error type, message)."""
    if upstream_fmt == "openai":
        if "error" not in obj:
            return None
        err = obj.get("error")
        err = err if isinstance(err, dict) else {}
        return "api_error", str(err.get("message", "upstream error"))[:300]
    if event != "error":
        return None
    err = obj.get("error")
    err = err if isinstance(err, dict) else {}
    return str(err.get("type", "api_error")), str(err.get("message", "upstream error"))[:300]


async def relay_stream(
    request: web.Request, ex: Exchange, up: aiohttp.ClientResponse, translator: StreamTranslator | None
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "x-request-id": ex.request_id})
    await resp.prepare(request)
    if translator is None:
        await _passthrough(ex, up, resp)
    else:
        await _translated(ex, up, resp, translator)
    return resp


def _observe(ex: Exchange, event: str, obj: dict[str, Any]) -> None:
    if ex.upstream_fmt == "openai":
        ex.tracker.observe_chunk(obj)
    else:
        ex.tracker.observe_event(event, obj)


_JSON_SPACE = (b" ", b"\t", b"\n", b"\r")


def _has_member(data: bytes, token: bytes, *, null_counts: bool) -> bool:
    """Whether the event's JSON has a member ``token`` (a key's quoted bytes), with a non-null value
    unless ``null_counts``. A quote inside a JSON string is escaped, so the token with its unescaped
    quotes followed by a colon can only be a key."""
    at = data.find(token)
    while at >= 0:
        pos = at + len(token)
        while data[pos : pos + 1] in _JSON_SPACE:
            pos += 1
        if data[pos : pos + 1] == b":":
            if null_counts:
                return True
            pos += 1
            while data[pos : pos + 1] in _JSON_SPACE:
                pos += 1
            if data[pos : pos + 4] != b"null":
                return True
        at = data.find(token, at + 1)
    return False


# Anthropic events that carry only output text (or nothing): the relay does not parse them.
_TEXT_ONLY_EVENTS = frozenset(("content_block_delta", "content_block_start", "content_block_stop", "ping"))


def _carries_billing(openai: bool, event: str | None, data: bytes) -> bool:
    """Whether a passthrough event may carry usage, an error or the end: only those are parsed as
    they pass; the text of every event is read later only if needed (UsageTracker.defer)."""
    if openai:
        return _has_member(data, b'"usage"', null_counts=False) or _has_member(data, b'"error"', null_counts=True)
    return event is None or event not in _TEXT_ONLY_EVENTS


def _marks(whole: bytes, openai: bool) -> list[int] | None:
    """Where in whole events (``\n`` line ends) an event may carry usage, an error or the end: the
    positions of its marks; None: every event may (look at all)."""
    found: list[int] = []
    if openai:
        for mark in (b"[DONE]", b'"error"'):
            at = whole.find(mark)
            while at >= 0:
                found.append(at)
                at = whole.find(mark, at + 1)
        # OpenAI writes "usage":null on every chunk: compact members are told apart by counting;
        # only a text written otherwise has each usage looked at. (Each count is a pass over the
        # text: ~3 us for a small reply's 8 KB, so a pass is skipped when its answer is known.)
        usages = whole.count(b'"usage"')
        nulls = whole.count(b'"usage":null') if usages else 0
        if usages == nulls:
            return found
        objects = whole.count(b'"usage":{')
        mark = b'"usage":{' if usages == objects + nulls else b'"usage"'
        at = whole.find(mark)
        while at >= 0:
            if mark != b'"usage"' or _has_member(whole[at : whole.find(b"\n", at)], mark, null_counts=False):
                found.append(at)
            at = whole.find(mark, at + 1)
        return found
    data_lines = whole.count(b"\ndata:") + whole.startswith(b"data:")
    event_lines = whole.count(b"\nevent:") + whole.startswith(b"event:")
    if data_lines > event_lines:
        return None  # an event without its event: line
    for mark in (b"message_", b"error"):
        at = whole.find(mark)
        while at >= 0:
            found.append(at)
            at = whole.find(mark, at + 1)
    return found


def _marked_blocks(whole: bytes, openai: bool) -> list[bytes]:
    """The blocks (events without their blank line) of ``whole`` holding a mark, in order; most
    often none (the text between the usage, the errors and the end)."""
    marks = _marks(whole, openai)
    if not marks:
        return [] if marks is not None else whole.split(b"\n\n")
    starts: dict[int, int] = {}
    for at in marks:
        start = whole.rfind(b"\n\n", 0, at)
        start = start + 2 if start >= 0 else 0
        if start not in starts:
            starts[start] = whole.find(b"\n\n", at)
    return [whole[start : starts[start]] for start in sorted(starts)]


class BillingEvents:
    """A passthrough stream's events that may carry usage, an error or its end (``[DONE]`` included),
    found without splitting the rest into events: only the blocks holding one of their marks are
    read; bytes after the last event boundary wait for the next chunk. The text is the tracker's,
    read only if ever needed. A stream with carriage returns (lines may end in CR or CRLF, cut
    anywhere) goes through the full parser."""

    __slots__ = ("_openai", "_parser", "_unread")

    def __init__(self, openai: bool) -> None:
        self._openai = openai
        self._parser = SSEParser()
        self._unread = b""  # bytes since the last event boundary, not given to the parser

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        data = self._unread + chunk if self._unread else chunk
        openai = self._openai
        # (One event longer than _MAX_UNREAD goes to the parser: no re-scanning it chunk after chunk.)
        if self._parser.idle and b"\r" not in data and len(data) <= _MAX_UNREAD:
            cut = data.rfind(b"\n\n")
            if cut < 0:
                self._unread = data
                return []
            whole, self._unread = data[: cut + 2], data[cut + 2 :]
            out = []
            for block in _marked_blocks(whole, openai):
                ev = event_of_block(block)
                if ev is not None and (ev.data == DONE or _carries_billing(openai, ev.event, ev.data)):
                    out.append(ev)
            return out
        self._unread = b""
        return self._billing(self._parser.feed(data))

    def close(self) -> list[SSEEvent]:
        """At the end of the stream: an event its upstream left without the blank line (or with a
        last CR the parser held back, waiting for an LF)."""
        events = self._parser.feed(self._unread) if self._unread else []
        self._unread = b""
        return self._billing(events + self._parser.close())

    def _billing(self, events: list[SSEEvent]) -> list[SSEEvent]:
        openai = self._openai
        return [ev for ev in events if ev.data == DONE or _carries_billing(openai, ev.event, ev.data)]


_MAX_UNREAD = 64 * 1024


async def _passthrough(ex: Exchange, up: aiohttp.ClientResponse, resp: web.StreamResponse) -> None:
    openai = ex.upstream_fmt == "openai"
    tracker = ex.tracker
    up_name, client_name = ex.model.upstream_model, ex.client_model
    # An OpenAI client that did not ask for usage must not get the extra usage-only chunk we asked
    # for: then events are re-framed one by one (still without re-encoding their JSON).
    filtering = openai and not ex.include_usage
    reader: SSEParser | BillingEvents = SSEParser() if filtering else BillingEvents(openai)
    # echo_model's patterns, looked up once a stream rather than once a chunk.
    rename = _model_patterns(up_name, client_name) if up_name != client_name else None
    saw_end = False

    async def handle(events: list[SSEEvent]) -> None:
        nonlocal saw_end
        for ev in events:
            data = ev.data
            if data == DONE:
                saw_end = True
                if filtering:
                    await resp.write(b"data: [DONE]\n\n")
                continue
            if _carries_billing(openai, ev.event, data):
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                event = ev.event or str(obj.get("type", ""))
                if openai:
                    tracker.observe_chunk(obj, pieces=False)
                else:
                    tracker.observe_event(event, obj, pieces=False)
                if _in_stream_error(ex.upstream_fmt, event, obj) is not None:
                    ex.status = "upstream_error"
                elif not openai and ev.event == "message_stop":
                    saw_end = True
                if filtering and not obj.get("choices") and "usage" in obj and "error" not in obj:
                    continue  # the usage chunk the client did not ask for
            if filtering:
                await resp.write(echo_model(b"data: " + data + b"\n\n", up_name, client_name))
                ex.produced = True

    try:
        async for chunk in up.content.iter_any():
            tracker.defer(chunk)  # the text, read only if ever needed
            if not filtering:
                if rename is not None:
                    chunk = chunk.replace(rename[0], rename[1]).replace(rename[2], rename[3])
                await resp.write(chunk)
                ex.produced = True
            events = reader.feed(chunk)
            if events:
                await handle(events)
        await handle(reader.close())  # an event left without its blank line at the end
    except TimeoutError:
        ex.status = "upstream_timeout"
        await _stream_error(ex, resp, "timeout_error", "The upstream model service stopped sending; the answer is incomplete.")
        return
    except aiohttp.ClientError:
        ex.status = "upstream_error"
        await _stream_error(ex, resp, "api_error", "The upstream connection broke; the answer is incomplete.")
        return
    if not saw_end and ex.status == "ok":
        ex.status = "upstream_error"
        await _stream_error(ex, resp, "api_error", "The upstream ended the stream early; the answer is incomplete.")
        return
    await resp.write_eof()


async def _translated(
    ex: Exchange, up: aiohttp.ClientResponse, resp: web.StreamResponse, translator: StreamTranslator
) -> None:
    parser = SSEParser()
    head = translator.start()
    if head:
        await resp.write(head)
    ex.produced = True
    try:
        async for chunk in up.content.iter_any():
            out = b""
            for ev in parser.feed(chunk):
                if ev.data == DONE:
                    continue
                try:
                    obj = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                event = ev.event or str(obj.get("type", ""))
                _observe(ex, event, obj)
                err = _in_stream_error(ex.upstream_fmt, event, obj)
                if err is not None:
                    ex.status = "upstream_error"
                    out += translator.error(*err)
                    continue
                out += translator.feed(event, obj)
            if out:
                await resp.write(out)
            elif chunk.startswith(b":"):
                # The upstream's keep-alive while it thinks: pass one on (a comment is valid SSE in
                # every format) so the client's idle timer does not give up on a live answer.
                await resp.write(b": keep-alive\n\n")
            if translator.done:
                break
    except TimeoutError:
        ex.status = "upstream_timeout"
        await resp.write(translator.error("timeout_error", "The upstream model service stopped sending; the answer is incomplete."))
        await resp.write(translator.finish())
        return
    except aiohttp.ClientError:
        ex.status = "upstream_error"
        await resp.write(translator.error("api_error", "The upstream connection broke; the answer is incomplete."))
        await resp.write(translator.finish())
        return
    tail = translator.finish()
    if tail:
        await resp.write(tail)
    tracker = ex.tracker
    if ex.status == "ok" and tracker.finish_reason is None and tracker.stop_reason is None:
        ex.status = "upstream_error"
    await resp.write_eof()


async def _stream_error(ex: Exchange, resp: web.StreamResponse, err_type: str, message: str) -> None:
    if ex.client.error_format == "anthropic":
        frame = format_json_event({"type": "error", "error": {"type": err_type, "message": message}}, "error")
    else:
        frame = format_json_event({"error": {"message": message, "type": err_type, "code": ex.status}})
    try:
        await resp.write(frame)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
