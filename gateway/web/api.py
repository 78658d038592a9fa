"""The JSON API under /api/ (session cookie; state-changing calls need the X-CSRF-Token header)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .. import errors as E
from ..jsonbody import read_json_object
from .csrf import check_csrf, csrf_token
from .export import export_history, export_usage
from .service import (
    account_view,
    close_account,
    create_key,
    daily_usage,
    history_page,
    keys_view,
    parse_threshold,
    renew_key,
    revoke_key,
    set_low_balance,
    usage_page,
)
from .sessions import current_account, end_session

__all__ = ["api_routes", "json_response", "require_account"]


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def require_account(request: web.Request) -> str:
    """The signed-in account, or 401 (for the payments routes too)."""
    account_id = await current_account(request)
    if account_id is None:
        raise E.Unauthorized("Sign in first: this call needs a signed-in browser session.")
    return account_id


def _int_param(
    request: web.Request, name: str, default: int | None, *, maximum: int = 2**53
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise E.BadRequest(f"'{name}' must be an integer.", param=name) from None
    if not -maximum <= value <= maximum:  # past SQLite's integers, a 500 rather than a 400
        raise E.BadRequest(f"'{name}' must be at most {maximum}.", param=name)
    return value


async def get_account(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    view = await account_view(request, account_id)
    # Scripts read the CSRF token here; other sites cannot read this response (no CORS).
    view["csrf_token"] = await csrf_token(request)
    return json_response(view)


async def get_keys(request: web.Request) -> web.Response:
    return json_response(await keys_view(request, await require_account(request)))


async def post_keys(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    return json_response(await create_key(request, account_id), status=201)


async def post_renew(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    return json_response(await renew_key(request, account_id, request.match_info["key_id"]), status=201)


async def delete_key(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    return json_response(await revoke_key(request, account_id, request.match_info["key_id"]))


async def get_usage(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    limit = _int_param(request, "limit", 50) or 50
    return json_response(
        await usage_page(request, account_id, limit=limit, before=_int_param(request, "before", None))
    )


async def get_daily(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    return json_response(await daily_usage(request, account_id, days=_int_param(request, "days", 30, maximum=36_600) or 30))


async def get_export(request: web.Request) -> web.StreamResponse:
    account_id = await require_account(request)
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise E.BadRequest("'format' must be csv or json.", param="format")
    return await export_usage(request, account_id, fmt)


async def get_history(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    limit = _int_param(request, "limit", 50) or 50
    before = request.query.get("before") or None
    return json_response(await history_page(request, account_id, limit=limit, before=before))


async def get_history_export(request: web.Request) -> web.StreamResponse:
    account_id = await require_account(request)
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise E.BadRequest("'format' must be csv or json.", param="format")
    return await export_history(request, account_id, fmt)


async def post_low_balance(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    body = await read_json_object(request, required=False)
    if "amount" not in body:
        raise E.BadRequest("'amount' is required (currency units; 0 switches the alert off).", param="amount")
    return json_response(await set_low_balance(request, account_id, parse_threshold(body["amount"])))


async def post_close(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    body = await read_json_object(request, required=False)
    if body.get("confirm") is not True:
        raise E.BadRequest('Closing the account needs {"confirm": true}.', param="confirm")
    result = await close_account(request, account_id)
    await end_session(request)
    return json_response(result)


def api_routes() -> list[web.RouteDef]:
    return [
        web.get("/api/account", get_account, allow_head=False),
        web.get("/api/keys", get_keys, allow_head=False),
        web.post("/api/keys", post_keys),
        web.post("/api/keys/{key_id}/renew", post_renew),
        web.delete("/api/keys/{key_id}", delete_key),
        web.get("/api/usage", get_usage, allow_head=False),
        web.get("/api/usage/daily", get_daily, allow_head=False),
        web.get("/api/usage/export", get_export, allow_head=False),
        web.get("/api/history", get_history, allow_head=False),
        web.get("/api/history/export", get_history_export, allow_head=False),
        web.post("/api/account/low-balance", post_low_balance),
        web.post("/api/account/close", post_close),
    ]
