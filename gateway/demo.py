"""The local ``demo`` model: an OpenAI-format upstream served by the gateway itself on loopback.

It streams a fixed reply token by token so a newcomer can try every client with no network and no
provider key. So that a coding agent's tool loop can be tried too, it plays one scripted turn: asked
to read a file (a path in the last user message) by a client that offers a file-reading tool, it
calls that tool; given the tool's result, it answers with the result's size and first line. Nothing
it reads is kept beyond the response.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from . import tokens

__all__ = ["DEMO_REPLY", "demo_routes"]

DEMO_REPLY = (
    "Hello from the Coding Plan demo model. This reply is streamed token by token from inside the "
    "gateway, metered like any other model, and charged to your credit to the micro-unit."
)
TOKEN_DELAY_S = 0.01
# File-reading tools of the common agents: Claude Code's Read, opencode's read, Cline's read_file, ...
_READ_TOOLS = re.compile(r"^(read|read_?file|view|view_?file|open_?file)$", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.[A-Za-z0-9]{1,8})(?![\w/])")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)


def _own_words(message: dict[str, Any]) -> str:
    """A user message's text without the reminders agents add (Claude Code's <system-reminder>)."""
    return _REMINDER.sub("", _text(message.get("content"))).strip()


def _read_tool(body: dict[str, Any]) -> tuple[str, str] | None:
    """(tool name, its path parameter) of a file-reading tool the client offers."""
    for tool in body.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not _READ_TOOLS.match(str(fn.get("name", ""))):
            continue
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        required = [p for p in params.get("required") or [] if p in props] or list(props)
        strings = [p for p in required if (props.get(p) or {}).get("type") == "string"]
        if strings:
            return str(fn["name"]), strings[0]
    return None


def scripted_turn(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(reply text, tool call or None) for the demo's one scripted agent turn; else the fixed reply."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    # Reminder-only user turns after a tool result are the agent's, not the person's.
    while len(messages) > 1 and messages[-1].get("role") == "user" and not _own_words(messages[-1]):
        messages.pop()
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        result = _text(last.get("content"))
        first = result.strip().splitlines()[0][:200] if result.strip() else ""
        return f"The tool returned {len(result.splitlines())} lines. The first one reads: {first}", None
    tool = _read_tool(body)
    if tool is not None and last.get("role") == "user":
        found = _PATH.search(_own_words(last))
        if found:
            name, param = tool
            args = orjson.dumps({param: found.group(1)}).decode()
            return "", {"id": f"call_demo{int(time.time() * 1000)}", "type": "function",
                        "function": {"name": name, "arguments": args}}
    return DEMO_REPLY, None


def _pieces(text: str) -> list[str]:
    enc = tokens.load_encoding()
    return [enc.decode([t]) for t in enc.encode_ordinary(text)]


def demo_routes(token_getter: Callable[[], str]) -> list[web.RouteDef]:
    fixed: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        # SECURITY: only the gateway itself may call the demo upstream.
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {token_getter()}".encode()):
            raise web.HTTPUnauthorized()
        if not fixed:
            fixed.extend(_pieces(DEMO_REPLY))
        body = orjson.loads(await request.read())
        prompt = await tokens.count_openai_request_async(body)
        reply, call = scripted_turn(body)
        pieces = fixed if reply is DEMO_REPLY else _pieces(reply)
        limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or len(pieces))
        out = pieces[: max(1, limit)]
        finish = "stop" if len(out) == len(pieces) else "length"
        produced = len(out) + (tokens.count_text(call["function"]["arguments"]) if call else 0)
        if call:
            out, finish = [], "tool_calls"
        usage = {"prompt_tokens": prompt, "completion_tokens": produced, "total_tokens": prompt + produced,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        cid = f"chatcmpl-demo{int(time.time() * 1000)}"
        created = int(time.time())
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(out) if not call else None}
            if call:
                message["tool_calls"] = [call]
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": "demo",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def frame(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": "demo",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }) + b"\n\n"

        await resp.write(frame({"role": "assistant", "content": ""}))
        for piece in out:
            await asyncio.sleep(TOKEN_DELAY_S)
            await resp.write(frame({"content": piece}))
        if call:
            await resp.write(frame({"tool_calls": [{"index": 0, **call}]}))
        await resp.write(frame({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": "demo",
                "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return [web.post("/_demo/v1/chat/completions", chat)]
