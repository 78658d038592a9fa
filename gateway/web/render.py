"""HTML for people: the page shell, small components and money/date display. Everything is escaped here."""

from __future__ import annotations

import html
from collections.abc import Iterable

from aiohttp import web

from ledger.money import format_micro

from .csrf import CSRF_FIELD

__all__ = [
    "date_of",
    "esc",
    "hidden_csrf",
    "html_response",
    "layout",
    "message_page",
    "money",
]

# SECURITY: no inline script or style anywhere; the one script and stylesheet come from /static/.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_NAV = (
    ("/", "Overview"),
    ("/topup", "Top up"),
    ("/keys", "API keys"),
    ("/usage", "Usage"),
    ("/history", "Credit history"),
    ("/account", "Account"),
)


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def money(micro: int, currency: str, places: int = 2) -> str:
    """Display only. Per-request charges use 6 places: they are often a fraction of a satang."""
    return f"{format_micro(micro, places)} {esc(currency)}"


def date_of(iso: str | None) -> str:
    """'2026-09-21T10:00:00.000Z' -> '2026-09-21 10:00 UTC' inside a <time> element."""
    if not iso:
        return "&mdash;"
    shown = iso[:16].replace("T", " ") + " UTC"
    return f'<time datetime="{esc(iso)}">{esc(shown)}</time>'


def hidden_csrf(token: str) -> str:
    return f'<input type="hidden" name="{CSRF_FIELD}" value="{esc(token)}">'


def layout(
    title: str,
    body: str,
    *,
    signed_in: bool = False,
    csrf: str | None = None,
    active: str | None = None,
) -> str:
    nav = ""
    if signed_in:
        current = ' aria-current="page"'
        links = "".join(
            f'<li><a href="{href}"{current if href == active else ""}>{label}</a></li>'
            for href, label in _NAV
        )
        logout = (
            f'<form method="post" action="/auth/logout" class="inline">{hidden_csrf(csrf or "")}'
            '<button type="submit" class="link">Sign out</button></form>'
        )
        nav = f'<nav aria-label="Main"><ul>{links}<li>{logout}</li></ul></nav>'
    meta = f'<meta name="csrf-token" content="{esc(csrf)}">' if csrf else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · Coding Plan</title>{meta}"
        '<link rel="stylesheet" href="/static/app.css">'
        '<script src="/static/app.js" defer></script></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><a class="brand" href="/">Coding Plan</a>{nav}</header>'
        f'<main id="main">{body}</main>'
        '<footer><a href="/privacy">Privacy</a></footer></body></html>'
    )


def html_response(page: str, status: int = 200, *, private: bool = True) -> web.Response:
    headers = {
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
        # Signed-in pages (and the one showing a new key) must never sit in a cache.
        "Cache-Control": "no-store" if private else "public, max-age=300",
    }
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8", headers=headers)


def message_page(
    title: str,
    message: str,
    *,
    status: int,
    links: Iterable[tuple[str, str]] = (("/", "Back to the start page"),),
    reason: str | None = None,
) -> web.Response:
    """A friendly page for a refusal or an error: what happened, and where to go next."""
    items = "".join(f'<li><a href="{esc(href)}">{esc(label)}</a></li>' for href, label in links)
    code = f'<p class="muted">Reason code: <code id="reason">{esc(reason)}</code></p>' if reason else ""
    body = (
        f'<section class="card" role="alert"><h1>{esc(title)}</h1><p id="message">{esc(message)}</p>'
        f"{code}<ul>{items}</ul></section>"
    )
    return html_response(layout(title, body), status=status)
