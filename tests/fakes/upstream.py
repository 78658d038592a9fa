"""A fake LLM provider on loopback that speaks the real OpenAI, DeepSeek and Anthropic wire formats.

A test sets a ``Script`` (frozen, so its rendered bytes are cached and the fake costs almost nothing
per chunk; change it with ``dataclasses.replace``) and reads back what the fake received::

    async with FakeUpstream() as fake:
        fake.script = Script(text="hi there", text_chunks=2, flavour="deepseek")
        fake.enqueue(Script(status=503))          # the next request only, then back to fake.script
        ... point the gateway at fake.openai_base_url / fake.anthropic_base_url ...
        assert fake.requests[-1].body["model"] == "deepseek-chat"
        await fake.wait_disconnects(1)            # the gateway hung up on us mid-stream

Routes: ``POST /v1/chat/completions`` and ``/chat/completions`` (OpenAI format, ``flavour`` picks
OpenAI or DeepSeek style), ``POST /v1/messages`` and ``/anthropic/v1/messages`` (Anthropic format).
Usage styles follow the providers: OpenAI reports usage in a trailing ``choices: []`` chunk only when
``stream_options.include_usage`` is set; DeepSeek puts it on the finish chunk; Anthropic splits it
between ``message_start`` (input, cache) and a cumulative ``message_delta`` (output).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.usage import Usage

__all__ = [
    "DEFAULT_TEXT",
    "DEFAULT_USAGE",
    "FakeToolCall",
    "FakeUpstream",
    "FakeUsage",
    "RecordedRequest",
    "Script",
    "fake_upstream",
    "split_text",
    "usage_for",
]

Api = Literal["openai", "anthropic"]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. Then it writes tests."
CREATED = 1_700_000_000
_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class FakeToolCall:
    name: str
    arguments: str = "{}"  # the JSON text; the Anthropic format sends it parsed, as ``input``
    id: str = ""  # empty: call_fake_<n> (OpenAI) or toolu_fake_<n> (Anthropic)


@dataclass(frozen=True, slots=True)
class FakeUsage:
    """Usage to report, in the gateway's buckets; the fake renders it in each provider's fields."""

    input_cache_hit: int = 0
    input_cache_miss: int = 0  # OpenAI flavours fold cache_write in here (they have no writes)
    output: int = 0
    cache_write: int = 0  # Anthropic cache_creation_input_tokens


DEFAULT_USAGE = FakeUsage(input_cache_hit=256, input_cache_miss=1024, output=42)


@dataclass(frozen=True, slots=True)
class Script:
    """What the fake does with one request. Every field has a harmless default."""

    text: str = DEFAULT_TEXT
    text_chunks: int = 4  # pieces the text is streamed in
    reasoning: str = ""  # DeepSeek reasoning_content / Anthropic thinking block, before the text
    reasoning_chunks: int = 2
    tool_calls: tuple[FakeToolCall, ...] = ()  # after the text; several = parallel calls
    argument_chunks: int = 3  # pieces each call's arguments are streamed in
    flavour: Literal["openai", "deepseek"] = "openai"  # OpenAI-format routes only
    usage: FakeUsage | None = DEFAULT_USAGE  # None: the upstream reports no usage at all
    finish_reason: str | None = None  # OpenAI format; default stop or tool_calls
    stop_reason: str | None = None  # Anthropic format; default end_turn or tool_use
    model: str | None = None  # default: echo the request's model
    first_byte_delay_s: float = 0.0
    chunk_delay_s: float = 0.0  # after each data frame
    status: int = 200  # an error status answers with the provider's error body
    error_type: str | None = None  # default from the status
    error_message: str = "fake upstream error"
    error_headers: tuple[tuple[str, str], ...] = ()  # e.g. (("retry-after", "1"),)
    die_after: int | None = None  # abort the TCP connection after this many data frames
    error_after: int | None = None  # send an in-stream error event after this many frames, then end
    stall_after: int | None = None  # stop sending after this many frames, keep the connection open
    hang: bool = False  # never answer at all (no status line)
    keepalives: int = 0  # ": keep-alive" comments before the first frame (blank lines, non-stream)
    keepalive_every: int = 0  # and one after every N data frames
    ping: bool = True  # Anthropic ``ping`` after message_start


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    raw: bytes
    body: Any  # the parsed JSON, None when the body was not JSON


def split_text(text: str, n: int) -> list[str]:
    """``text`` in ``n`` near-equal non-empty pieces (fewer when it is shorter than ``n``)."""
    if not text:
        return []
    n = max(1, min(n, len(text)))
    size = -(-len(text) // n)
    return [text[i : i + size] for i in range(0, len(text), size)]


def usage_for(script: Script, api: Api, *, stream: bool = False, include_usage: bool = False) -> Usage | None:
    """The usage a correct UsageTracker derives from this script's response; None if none is sent."""
    u = script.usage
    if u is None:
        return None
    if api == "anthropic":
        return Usage(u.input_cache_hit, u.input_cache_miss, u.output, u.cache_write)
    if stream and script.flavour == "openai" and not include_usage:
        return None
    return Usage(u.input_cache_hit, u.input_cache_miss + u.cache_write, u.output, 0)


# ---- rendering (pure functions of the script, cached) --------------------------------------------


def _tool_id(call: FakeToolCall, n: int, api: Api) -> str:
    return call.id or (f"toolu_fake_{n}" if api == "anthropic" else f"call_fake_{n}")


def _openai_usage(script: Script) -> dict[str, Any] | None:
    u = script.usage
    if u is None:
        return None
    miss = u.input_cache_miss + u.cache_write
    prompt = u.input_cache_hit + miss
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": u.output,
        "total_tokens": prompt + u.output,
        "prompt_tokens_details": {"cached_tokens": u.input_cache_hit},
    }
    if script.flavour == "deepseek":
        out["prompt_cache_hit_tokens"] = u.input_cache_hit
        out["prompt_cache_miss_tokens"] = miss
    else:
        out["prompt_tokens_details"]["audio_tokens"] = 0
        out["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
    return out


def _anthropic_usage(script: Script, output: int) -> dict[str, Any] | None:
    u = script.usage
    if u is None:
        return None
    return {
        "input_tokens": u.input_cache_miss,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.input_cache_hit,
        "output_tokens": output,
    }


def _finish_reason(script: Script) -> str:
    return script.finish_reason or ("tool_calls" if script.tool_calls else "stop")


def _stop_reason(script: Script) -> str:
    return script.stop_reason or ("tool_use" if script.tool_calls else "end_turn")


def _sse(obj: Any, event: str | None = None) -> bytes:
    data = orjson.dumps(obj)
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


@functools.lru_cache(maxsize=256)
def _openai_stream(script: Script, model: str, include_usage: bool) -> tuple[bytes, ...]:
    deepseek = script.flavour == "deepseek"
    head = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    # OpenAI marks every chunk usage:null when include_usage is set; DeepSeek only fills the last.
    null_usage = {"usage": None} if include_usage and not deepseek else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **null_usage, **extra})

    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [
        chunk({"content": None, "reasoning_content": p})
        for p in split_text(script.reasoning, script.reasoning_chunks)
    ]
    frames += [chunk({"content": p}) for p in split_text(script.text, script.text_chunks)]
    for n, call in enumerate(script.tool_calls):
        first = {
            "index": n,
            "id": _tool_id(call, n, "openai"),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        frames.append(chunk({"tool_calls": [first]}))
        for piece in split_text(call.arguments, script.argument_chunks):
            frames.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": piece}}]}))
    usage = _openai_usage(script)
    if deepseek:
        frames.append(chunk({}, _finish_reason(script), usage=usage))
    else:
        frames.append(chunk({}, _finish_reason(script)))
        if include_usage and usage is not None:
            frames.append(_sse({**head, "choices": [], "usage": usage}))
    frames.append(_DONE)
    return tuple(frames)


@functools.lru_cache(maxsize=256)
def _openai_body(script: Script, model: str) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": script.text or None, "refusal": None}
    if script.reasoning:
        message["reasoning_content"] = script.reasoning
    if script.tool_calls:
        message["tool_calls"] = [
            {
                "id": _tool_id(c, n, "openai"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for n, c in enumerate(script.tool_calls)
        ]
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(script)}
        ],
        "system_fingerprint": "fp_fake",
    }
    usage = _openai_usage(script)
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def _anthropic_blocks(script: Script) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if script.reasoning:
        blocks.append({"type": "thinking", "thinking": script.reasoning, "signature": "fake-signature"})
    if script.text:
        blocks.append({"type": "text", "text": script.text})
    for n, call in enumerate(script.tool_calls):
        blocks.append(
            {
                "type": "tool_use",
                "id": _tool_id(call, n, "anthropic"),
                "name": call.name,
                "input": orjson.loads(call.arguments or "{}"),
            }
        )
    return blocks


@functools.lru_cache(maxsize=256)
def _anthropic_stream(script: Script, model: str) -> tuple[bytes, ...]:
    message: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    start_usage = _anthropic_usage(script, 1)  # Anthropic reports a token or so of output here
    if start_usage is not None:
        message["usage"] = start_usage
    frames = [_sse({"type": "message_start", "message": message}, "message_start")]
    if script.ping:
        frames.append(_sse({"type": "ping"}, "ping"))

    def block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        frames.append(
            _sse(
                {"type": "content_block_start", "index": index, "content_block": start}, "content_block_start"
            )
        )
        for delta in deltas:
            frames.append(
                _sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
            )
        frames.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

    index = 0
    if script.reasoning:
        deltas = [
            {"type": "thinking_delta", "thinking": p}
            for p in split_text(script.reasoning, script.reasoning_chunks)
        ]
        deltas.append({"type": "signature_delta", "signature": "fake-signature"})
        block(index, {"type": "thinking", "thinking": "", "signature": ""}, deltas)
        index += 1
    if script.text:
        deltas = [{"type": "text_delta", "text": p} for p in split_text(script.text, script.text_chunks)]
        block(index, {"type": "text", "text": ""}, deltas)
        index += 1
    for n, call in enumerate(script.tool_calls):
        start = {"type": "tool_use", "id": _tool_id(call, n, "anthropic"), "name": call.name, "input": {}}
        deltas = [
            {"type": "input_json_delta", "partial_json": p}
            for p in split_text(call.arguments, script.argument_chunks)
        ]
        block(index, start, deltas)
        index += 1
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(script), "stop_sequence": None},
    }
    if script.usage is not None:
        delta["usage"] = {"output_tokens": script.usage.output}  # cumulative, as Anthropic sends it
    frames.append(_sse(delta, "message_delta"))
    frames.append(_sse({"type": "message_stop"}, "message_stop"))
    return tuple(frames)


@functools.lru_cache(maxsize=256)
def _anthropic_body(script: Script, model: str) -> bytes:
    body: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_blocks(script),
        "stop_reason": _stop_reason(script),
        "stop_sequence": None,
    }
    usage = _anthropic_usage(script, script.usage.output if script.usage else 0)
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _thinking_mode(body: dict[str, Any]) -> bool:
    thinking = body.get("thinking")
    model = str(body.get("model", ""))
    return "reasoner" in model or (isinstance(thinking, dict) and thinking.get("type") == "enabled")


def openai_request_problem(body: dict[str, Any]) -> str:
    """The real rules an OpenAI-format upstream enforces that a translating gateway can break."""
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            return f"messages[{i}]: unknown role"
        # DeepSeek's thinking mode: a tool-calling assistant turn must carry its reasoning back.
        if _thinking_mode(body) and m.get("role") == "assistant" and m.get("tool_calls"):
            if not isinstance(m.get("reasoning_content"), str):
                return "The reasoning_content in the thinking mode must be passed back to the API."
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            return f"{name}: must be a positive integer"
    return ""


def anthropic_request_problem(request: web.Request, body: dict[str, Any]) -> str:
    betas = request.headers.get("anthropic-beta", "")
    for i, m in enumerate(body["messages"]):
        role = m.get("role") if isinstance(m, dict) else None
        # Claude Code 2.1 sends system messages under its mid-conversation-* betas.
        if role not in ("user", "assistant") and not (role == "system" and "mid-conversation-" in betas):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= body["max_tokens"] and "interleaved-thinking" not in betas:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    return ""


def _error_obj(api: Api, status: int, error_type: str | None, message: str) -> dict[str, Any]:
    if api == "anthropic":
        kind = error_type or _ANTHROPIC_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}
    kind = error_type or _OPENAI_ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _stream_error_frame(api: Api, script: Script) -> bytes:
    if api == "anthropic":
        kind = script.error_type or "overloaded_error"
        return _sse({"type": "error", "error": {"type": kind, "message": script.error_message}}, "error")
    kind = script.error_type or "server_error"
    return _sse({"error": {"message": script.error_message, "type": kind, "param": None, "code": None}})


# ---- the server --------------------------------------------------------------------------------


class _Gone(Exception):
    """The script killed the connection on purpose; not a client disconnect."""


class FakeUpstream:
    """The fake provider: ``async with FakeUpstream() as fake`` or ``await start()`` / ``close()``."""

    def __init__(self, script: Script | None = None, *, api_key: str | None = None) -> None:
        self.script = script or Script()
        self.api_key = api_key  # when set, requests without it get the provider's 401
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0  # responses whose client went away before the end
        self.completed = 0  # responses written to the end (including scripted errors)
        self.active = 0  # requests being answered now
        self._queue: list[Script] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        app = web.Application()
        for path in ("/v1/chat/completions", "/chat/completions"):
            app.router.add_post(path, self._openai)
        for path in ("/v1/messages", "/anthropic/v1/messages"):
            app.router.add_post(path, self._anthropic)
        self.app = app

    # -- lifecycle --

    async def start(self) -> None:
        # handler_cancellation: a client that hangs up cancels the handler even while it sleeps,
        # so a disconnect is seen during delays and hangs, not only on the next write.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """A provider ``base_url`` for format "openai" (the gateway appends /chat/completions)."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """A provider ``base_url`` for format "anthropic" (the gateway appends /v1/messages)."""
        return self.url

    # -- test controls --

    def enqueue(self, *scripts: Script) -> None:
        """Scripts for the next requests, one each, before falling back to ``self.script``."""
        self._queue.extend(scripts)

    def reset(self) -> None:
        self.requests.clear()
        self._queue.clear()
        self.disconnects = self.completed = 0

    async def wait_disconnects(self, n: int = 1, timeout: float = 5.0) -> None:
        """Until at least ``n`` clients went away mid-response; TimeoutError otherwise."""
        await self._wait(lambda: self.disconnects >= n, timeout)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Until no request is being answered (e.g. after the gateway cancelled one)."""
        await self._wait(lambda: self.active == 0, timeout)

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        if predicate():
            return
        entry = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await entry[1]
        finally:
            self._waiters.remove(entry)

    def _changed(self) -> None:
        # Synchronous, so it also works from a handler that is being cancelled.
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    # -- handlers --

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic")

    async def _handle(self, request: web.Request, api: Api) -> web.StreamResponse:
        script = self._queue.pop(0) if self._queue else self.script
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            RecordedRequest(
                request.method, request.path, request.query_string, CIMultiDict(request.headers), raw, body
            )
        )
        self.active += 1
        try:
            response = await self._answer(request, api, script, body)
            self.completed += 1
            return response
        except _Gone:
            self.completed += 1  # the script cut the connection; the client did not leave
            raise asyncio.CancelledError from None
        except (ConnectionResetError, asyncio.CancelledError):
            # A failed write, or (handler_cancellation) the connection closing under a sleep.
            self.disconnects += 1
            raise
        finally:
            self.active -= 1
            self._changed()

    def _refusal(self, request: web.Request, api: Api, body: Any) -> web.Response | None:
        # Enough validation to catch a gateway that forwards a broken body or the wrong key.
        if self.api_key is not None:
            bearer = request.headers.get("Authorization", "")
            given = request.headers.get("x-api-key") if api == "anthropic" else None
            if given != self.api_key and bearer != f"Bearer {self.api_key}":
                return self._error(api, 401, None, "invalid api key", ())
        if not isinstance(body, dict):
            return self._error(api, 400, None, "body is not a JSON object", ())
        if not isinstance(body.get("model"), str):
            return self._error(api, 400, None, "model: field required", ())
        if not isinstance(body.get("messages"), list):
            return self._error(api, 400, None, "messages: field required", ())
        if api == "anthropic" and not isinstance(body.get("max_tokens"), int):
            return self._error(api, 400, None, "max_tokens: field required", ())
        problem = anthropic_request_problem(request, body) if api == "anthropic" else openai_request_problem(body)
        if problem:
            return self._error(api, 400, None, problem, ())
        return None

    @staticmethod
    def _error(
        api: Api, status: int, kind: str | None, message: str, headers: Sequence[tuple[str, str]]
    ) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps(_error_obj(api, status, kind, message)),
            content_type="application/json",
            headers=dict(headers),
        )

    async def _answer(self, request: web.Request, api: Api, script: Script, body: Any) -> web.StreamResponse:
        refusal = self._refusal(request, api, body)
        if refusal is not None:
            return refusal
        if script.hang:
            await asyncio.Event().wait()
        if script.status != 200:
            if script.first_byte_delay_s:
                await asyncio.sleep(script.first_byte_delay_s)
            return self._error(
                api, script.status, script.error_type, script.error_message, script.error_headers
            )
        model = script.model or body["model"]
        stream = body.get("stream") is True
        if not stream:
            payload = _openai_body(script, model) if api == "openai" else _anthropic_body(script, model)
            return await self._write_body(request, script, payload)
        if api == "openai":
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            frames = _openai_stream(script, model, include_usage)
        else:
            frames = _anthropic_stream(script, model)
        return await self._write_stream(request, api, script, frames)

    async def _write_body(self, request: web.Request, script: Script, payload: bytes) -> web.StreamResponse:
        if not script.keepalives:
            if script.first_byte_delay_s:
                await asyncio.sleep(script.first_byte_delay_s)
            return web.Response(body=payload, content_type="application/json")
        # DeepSeek under load: headers first, then blank lines while it thinks, then the JSON.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(script.keepalives):
            await response.write(b"\n")
            await asyncio.sleep(script.first_byte_delay_s / script.keepalives)
        await response.write(payload)
        await response.write_eof()
        return response

    async def _write_stream(
        self, request: web.Request, api: Api, script: Script, frames: tuple[bytes, ...]
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        if api == "anthropic":
            headers["request-id"] = "req_fake"
        response = web.StreamResponse(headers=headers)
        if script.keepalives:
            await response.prepare(request)
            for _ in range(script.keepalives):
                await response.write(_KEEPALIVE)
                await asyncio.sleep(script.first_byte_delay_s / script.keepalives)
        else:
            if script.first_byte_delay_s:
                await asyncio.sleep(script.first_byte_delay_s)
            await response.prepare(request)
        write = response.write
        delay = script.chunk_delay_s
        every = script.keepalive_every
        # The common case (no faults, no delays) is one tight loop over pre-encoded frames.
        cut = min(
            (k for k in (script.die_after, script.error_after, script.stall_after) if k is not None),
            default=None,
        )
        for n, frame in enumerate(frames if cut is None else frames[:cut]):
            await write(frame)
            if every and (n + 1) % every == 0:
                await write(_KEEPALIVE)
            if delay:
                await asyncio.sleep(delay)
        if cut is not None:
            if cut == script.die_after:
                transport = request.transport
                if transport is not None:
                    transport.abort()  # RST, no terminator: the client sees a truncated body
                raise _Gone
            if cut == script.error_after:
                await write(_stream_error_frame(api, script))
            else:
                await asyncio.Event().wait()  # stall until the client gives up
        await response.write_eof()
        return response


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """A running FakeUpstream per test; import it into a test module to use it."""
    async with FakeUpstream() as fake:
        yield fake
