"""The local ``demo`` model: an OpenAI-format upstream served by the gateway itself on loopback.

It streams a fixed reply token by token so a newcomer can try every client with no network and no
provider key. It never looks at what the request says beyond counting it for usage.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from . import tokens

__all__ = ["DEMO_REPLY", "demo_routes"]

DEMO_REPLY = (
    "Hello from the Coding Plan demo model. This reply is streamed token by token from inside the "
    "gateway, metered like any other model, and charged to your credit to the micro-unit."
)
TOKEN_DELAY_S = 0.01


def _pieces() -> list[str]:
    enc = tokens.load_encoding()
    return [enc.decode([t]) for t in enc.encode_ordinary(DEMO_REPLY)]


def demo_routes(token_getter: Callable[[], str]) -> list[web.RouteDef]:
    pieces: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        # SECURITY: only the gateway itself may call the demo upstream.
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {token_getter()}".encode()):
            raise web.HTTPUnauthorized()
        if not pieces:
            pieces.extend(_pieces())
        body = orjson.loads(await request.read())
        prompt = tokens.count_openai_request(body)
        limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or len(pieces))
        out = pieces[: max(1, limit)]
        finish = "stop" if len(out) == len(pieces) else "length"
        usage = {"prompt_tokens": prompt, "completion_tokens": len(out), "total_tokens": prompt + len(out),
                 "prompt_tokens_details": {"cached_tokens": 0}}
        cid = f"chatcmpl-demo{int(time.time() * 1000)}"
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": "demo",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(out)},
                             "finish_reason": finish}],
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
        await resp.write(frame({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": "demo",
                "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return [web.post("/_demo/v1/chat/completions", chat)]
