"""Coding-tool routes besides the proxy: models, balance, count_tokens, health, readiness, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ledger.epoch import is_whole
from ledger.money import iso_ms

from . import errors as E
from .appkeys import COUNT_SLOTS, LEDGER, METRICS, PROXY, REGISTRY, SETTINGS
from .auth import authenticate
from .estimate import estimate_prompt
from .jsonbody import read_json_object
from .limits import check_metrics_access
from .proxy import Proxy

__all__ = ["api_routes"]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    await authenticate(request, request.app[LEDGER])
    registry = request.app[REGISTRY]
    # Models and their plain aliases (Claude Code's picker shows only ids that begin with claude or
    # anthropic, so an operator can put a model there under a claude- alias).
    names = registry.listed_names()
    if "anthropic-version" in request.headers:
        data = [
            {"type": "model", "id": name, "display_name": m.display_name, "created_at": iso_ms(m.created * 1000)}
            for name, m in names
        ]
        return _json({
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        })
    return _json({
        "object": "list",
        "data": [{"id": name, "object": "model", "created": m.created, "owned_by": m.provider.name} for name, m in names],
    })


async def balance(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    key = await authenticate(request, ledger)
    bal = await ledger.balance(key.account_id)
    now = ledger.now_ms()
    return _json({
        "account_id": bal.account_id,
        "currency": request.app[REGISTRY].currency,
        "available_micro": bal.available_micro,
        "reserved_micro": bal.reserved_micro,
        "low_balance": bal.low_balance,
        "buckets": [
            {
                "bucket_id": b.bucket_id,
                "amount_micro": b.amount_micro,
                "remaining_micro": b.remaining_micro,
                "expires_at": iso_ms(b.expires_at),
                "expired": b.expires_at <= now,
                "source": b.source,
            }
            for b in bal.buckets
        ],
    })


async def count_tokens(request: web.Request) -> web.Response:
    key = await authenticate(request, request.app[LEDGER])
    # Free to the caller, so limited on its own: a smaller body cap and a few at a time per key.
    with request.app[COUNT_SLOTS].slot(key.key_id):
        return await _count_tokens(request)


async def _count_tokens(request: web.Request) -> web.Response:
    body = await read_json_object(request, max_bytes=request.app[SETTINGS].count_tokens_max_bytes)
    model = body.get("model")
    if not isinstance(model, str) or request.app[REGISTRY].get(model) is None:
        raise E.NotFound(f"Model {model!r} is not available here; GET /v1/models lists the models.", param="model")
    if not isinstance(body.get("messages"), list):
        raise E.BadRequest("'messages' is required and must be an array.", param="messages")
    # Counted locally for every model: free, and the exact count a hold falls back to. An agent asks
    # again as its conversation grows; the count cache makes that count only the new turns.
    return _json({"input_tokens": await estimate_prompt(body, "anthropic").exact()})


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    try:
        whole = await asyncio.wait_for(is_whole(request.app[LEDGER]), timeout=2)
    except Exception:
        return _json({"ok": False, "redis": "unreachable"}, status=503)
    if not whole:
        # Reachable but without its epoch markers: the data is gone until `python -m ledger rebuild`.
        return _json({"ok": False, "redis": "ok", "ledger": "being restored"}, status=503)
    return _json({"ok": True, "redis": "ok", "ledger": "ok"})


async def metrics(request: web.Request) -> web.Response:
    check_metrics_access(request, request.app[SETTINGS].metrics_token)
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def head_root(request: web.Request) -> web.Response:
    return web.Response()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    proxy: Proxy = request.app[PROXY]
    return await proxy.chat_completions(request)


async def messages(request: web.Request) -> web.StreamResponse:
    proxy: Proxy = request.app[PROXY]
    return await proxy.messages(request)


async def responses(request: web.Request) -> web.StreamResponse:
    proxy: Proxy = request.app[PROXY]
    return await proxy.responses(request)


async def responses_compact(request: web.Request) -> web.StreamResponse:
    proxy: Proxy = request.app[PROXY]
    return await proxy.responses_compact(request)


async def responses_websocket(request: web.Request) -> web.Response:
    # Codex may try a WebSocket on /v1/responses first; 426 is what it falls back to HTTP from.
    if request.headers.get("Upgrade", "").lower() == "websocket":
        raise E.UpgradeRequired("This gateway serves the Responses API over HTTP only; POST /v1/responses.")
    raise E.MethodNotAllowed("Use POST /v1/responses.")


def api_routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/messages", messages),
        web.post("/v1/messages/count_tokens", count_tokens),
        web.post("/v1/responses", responses),
        web.get("/v1/responses", responses_websocket, allow_head=False),
        web.post("/v1/responses/compact", responses_compact),
        web.get("/v1/models", list_models, allow_head=False),
        web.get("/v1/balance", balance, allow_head=False),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
        web.head("/", head_root),
    ]
