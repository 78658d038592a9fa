"""Server-rendered pages: sign-in, overview, API keys, usage, credit history, account. Forms work without JavaScript."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ledger import errors as LE

from .. import errors as E
from ..appkeys import SETTINGS
from ..middlewares import ledger_to_gateway
from . import html_pages as H
from .csrf import CSRF_FIELD, check_csrf, csrf_token
from .render import html_response, layout, message_page
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
from .signin import OIDC, demo_available

__all__ = ["page_routes"]

PageHandler = Callable[[web.Request, str], Awaitable[web.Response]]


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _signed_in(
    *, form: bool = False
) -> Callable[[PageHandler], Callable[[web.Request], Awaitable[web.Response]]]:
    """Page wrapper: redirect to sign-in when signed out, check CSRF on forms, render errors as pages."""

    def wrap(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        @functools.wraps(handler)
        async def page(request: web.Request) -> web.Response:
            account_id = await current_account(request)
            if account_id is None:
                if form:
                    return message_page(
                        "Signed out", "Your session has ended; please sign in again.", status=401
                    )
                return _see_other("/")
            try:
                if form:
                    data = await request.post()
                    await check_csrf(request, str(data.get(CSRF_FIELD, "")))
                return await handler(request, account_id)
            except LE.LedgerError as err:
                return _error_page(ledger_to_gateway(err))
            except E.GatewayError as err:
                return _error_page(err)

        return page

    return wrap


def _error_page(err: E.GatewayError) -> web.Response:
    titles = {
        400: "Please check the form",
        403: "Request refused",
        404: "Not found",
        409: "Not possible right now",
    }
    return message_page(titles.get(err.status, "Something went wrong"), err.message, status=err.status)


async def _page(request: web.Request, title: str, body: str, active: str) -> web.Response:
    return html_response(layout(title, body, signed_in=True, csrf=await csrf_token(request), active=active))


async def index(request: web.Request) -> web.Response:
    account_id = await current_account(request)
    if account_id is None:
        settings = request.app[SETTINGS]
        body = H.signin_body(
            google=request.app.get(OIDC) is not None,
            demo=demo_available(request.app),
            csrf=await csrf_token(request),
            embedded=settings.embedded,
        )
        return html_response(layout("Sign in", body, csrf=await csrf_token(request)))
    return await overview(request)


@_signed_in()
async def overview(request: web.Request, account_id: str) -> web.Response:
    view = await account_view(request, account_id)
    keys = await keys_view(request, account_id)
    return await _page(request, "Overview", H.overview_body(view, len(keys["keys"])), "/")


@_signed_in()
async def keys_page(request: web.Request, account_id: str) -> web.Response:
    view = await keys_view(request, account_id)
    return await _page(request, "API keys", H.keys_body(view, await csrf_token(request)), "/keys")


@_signed_in(form=True)
async def keys_create(request: web.Request, account_id: str) -> web.Response:
    new = await create_key(request, account_id)
    return await _page(request, "Your new API key", H.new_key_body(new, renewed=False), "/keys")


@_signed_in(form=True)
async def keys_renew(request: web.Request, account_id: str) -> web.Response:
    new = await renew_key(request, account_id, request.match_info["key_id"])
    return await _page(request, "Your renewed API key", H.new_key_body(new, renewed=True), "/keys")


@_signed_in(form=True)
async def keys_revoke(request: web.Request, account_id: str) -> web.Response:
    await revoke_key(request, account_id, request.match_info["key_id"])
    return _see_other("/keys")


@_signed_in()
async def usage(request: web.Request, account_id: str) -> web.Response:
    raw = request.query.get("before", "")
    before = int(raw) if raw.isdigit() else None
    rows = await usage_page(request, account_id, limit=50, before=before)
    daily = await daily_usage(request, account_id, days=30)
    return await _page(request, "Usage", H.usage_body(rows, daily, first_page=before is None), "/usage")


@_signed_in()
async def history(request: web.Request, account_id: str) -> web.Response:
    before = request.query.get("before") or None
    page = await history_page(request, account_id, limit=50, before=before)
    return await _page(request, "Credit history", H.history_body(page, first_page=before is None), "/history")


@_signed_in()
async def account_page(request: web.Request, account_id: str) -> web.Response:
    view = await account_view(request, account_id)
    return await _page(request, "Account", H.account_body(view, await csrf_token(request)), "/account")


@_signed_in(form=True)
async def low_balance_form(request: web.Request, account_id: str) -> web.Response:
    data = await request.post()
    await set_low_balance(request, account_id, parse_threshold(str(data.get("amount", ""))))
    return _see_other("/account")


@_signed_in(form=True)
async def close_form(request: web.Request, account_id: str) -> web.Response:
    data = await request.post()
    if data.get("confirm") != "yes":
        raise E.BadRequest("Tick the box to confirm that you want to close the account.")
    result: dict[str, Any] = await close_account(request, account_id)
    await end_session(request)
    body = H.closed_body(result)
    return html_response(layout("Account closed", body))


async def privacy(request: web.Request) -> web.Response:
    signed_in = await current_account(request) is not None
    csrf = await csrf_token(request) if signed_in else None
    return html_response(
        layout("Privacy", H.privacy_body(), signed_in=signed_in, csrf=csrf), private=signed_in
    )


def page_routes() -> list[web.RouteDef]:
    return [
        web.get("/", index, allow_head=False),
        web.get("/keys", keys_page, allow_head=False),
        web.post("/keys", keys_create),
        web.post("/keys/{key_id}/renew", keys_renew),
        web.post("/keys/{key_id}/revoke", keys_revoke),
        web.get("/usage", usage, allow_head=False),
        web.get("/history", history, allow_head=False),
        web.get("/account", account_page, allow_head=False),
        web.post("/account/low-balance", low_balance_form),
        web.post("/account/close", close_form),
        web.get("/privacy", privacy, allow_head=False),
    ]
