"""The body of each page as HTML, built from the same JSON-ready data the /api/ routes return."""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from ledger.ledger import DEFAULT_BUCKET_LIFE_S, MAX_LIVE_KEYS
from ledger.money import format_micro

from .charts import daily_chart
from .privacy import privacy_body
from .render import date_of, esc, hidden_csrf, money

__all__ = [
    "account_body",
    "closed_body",
    "history_body",
    "keys_body",
    "new_key_body",
    "overview_body",
    "privacy_body",
    "signin_body",
    "usage_body",
]

BUCKET_LIFE_DAYS = DEFAULT_BUCKET_LIFE_S // 86400
_SOURCES = {"topup": "Top-up", "trial": "Trial credit", "grant": "Grant"}


def signin_body(*, google: bool, demo: bool, csrf: str, embedded: bool) -> str:
    parts = [
        '<section class="card"><h1>Sign in</h1>',
        "<p>Prepaid credit for your AI coding tools. Sign in to see your balance, keys and usage.</p>",
    ]
    if google:
        parts.append(
            '<p><a class="button" id="google-signin" href="/auth/google">Sign in with Google</a></p>'
        )
    else:
        parts.append(
            '<p class="notice" id="signin-unconfigured">Sign-in is not configured on this server '
            "(GOOGLE_CLIENT_ID and GOOGLE_CLIENT_SECRET are not set).</p>"
        )
    if demo:
        parts.append(
            '<form method="post" action="/auth/demo" class="demo">'
            f"{hidden_csrf(csrf)}<h2>Local demo sign-in</h2>"
            "<p>This server runs in its embedded default, <strong>not for production</strong>. "
            "Demo sign-in opens the dashboard of the local demo account, no Google account needed.</p>"
            '<button type="submit" id="demo-signin">Demo sign-in (local only)</button></form>'
        )
    elif embedded and not google:
        parts.append("<p>The demo account's API key is printed in the server's console.</p>")
    parts.append('<p><a href="/privacy">What we store, and what we never store</a></p></section>')
    return "".join(parts)


def _warnings(view: dict[str, Any]) -> str:
    cur = view["currency"]
    items = []
    if view["low_balance"]:
        items.append(
            f'<li id="warn-low">Your balance ({money(view["available_micro"], cur)}) is below your alert '
            f"threshold of {money(view['low_threshold_micro'], cur)}.</li>"
        )
    for b in view["buckets"]:
        if b["expiring_soon"]:
            items.append(
                f'<li class="warn-expiry">{money(b["remaining_micro"], cur)} of credit expires on '
                f"{date_of(b['expires_at'])}; unused credit is forfeited at expiry.</li>"
            )
    if not items:
        return ""
    return f'<section class="warnings" role="alert" aria-label="Warnings"><ul>{"".join(items)}</ul></section>'


def _buckets_table(view: dict[str, Any]) -> str:
    cur = view["currency"]
    if not view["buckets"]:
        return '<p id="no-credit">No credit yet.</p>'
    rows = []
    for b in view["buckets"]:
        state = "expired" if b["expired"] else "expires soon" if b["expiring_soon"] else "active"
        rows.append(
            f'<tr class="{esc(state.replace(" ", "-"))}"><td>{esc(_SOURCES.get(b["source"], b["source"]))}</td>'
            f'<td class="num">{money(b["amount_micro"], cur)}</td>'
            f'<td class="num">{money(b["remaining_micro"], cur)}</td>'
            f"<td>{date_of(b['expires_at'])}</td><td>{esc(state)}</td></tr>"
        )
    return (
        '<table id="buckets"><caption>Credit buckets (a charge draws from the one expiring soonest)</caption>'
        '<thead><tr><th scope="col">Source</th><th scope="col">Amount</th><th scope="col">Remaining</th>'
        f'<th scope="col">Expires</th><th scope="col">State</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def overview_body(view: dict[str, Any], key_count: int) -> str:
    cur = view["currency"]
    keys_hint = (
        '<p><a class="button" href="/keys">Create your first API key</a></p>' if key_count == 0 else ""
    )
    return (
        f"<h1>Overview</h1>{_warnings(view)}"
        '<section class="card balance"><h2>Available balance</h2>'
        f'<p class="big" id="available">{money(view["available_micro"], cur)}</p>'
        f'<p class="muted">Held by requests in progress: {money(view["reserved_micro"], cur)}</p>'
        f"{keys_hint}"
        '<p><a class="button" id="topup-link" href="/topup">Top up or refund</a></p></section>'
        f'<section class="card"><h2>Credit</h2>{_buckets_table(view)}'
        f'<p class="muted">Each top-up is a bucket that expires {BUCKET_LIFE_DAYS} days after it was bought.</p>'
        "</section>"
    )


def keys_body(view: dict[str, Any], csrf: str) -> str:
    rows = []
    for k in view["keys"]:
        kid = esc(k["key_id"])
        rows.append(
            f'<tr data-key-id="{kid}"><td><code>{esc(k["prefix"])}…</code></td><td>{date_of(k["created_at"])}</td>'
            f'<td>{date_of(k["last_used_at"])}</td><td class="actions">'
            f'<form method="post" action="/keys/{kid}/renew" class="inline">{hidden_csrf(csrf)}'
            f'<button type="submit" aria-label="Renew key {esc(k["prefix"])}">Renew</button></form> '
            f'<form method="post" action="/keys/{kid}/revoke" class="inline">{hidden_csrf(csrf)}'
            f'<button type="submit" class="danger" aria-label="Revoke key {esc(k["prefix"])}">Revoke</button>'
            "</form></td></tr>"
        )
    table = (
        '<table id="keys"><caption>Your API keys</caption><thead><tr><th scope="col">Key</th>'
        '<th scope="col">Created</th><th scope="col">Last used</th><th scope="col">Actions</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p id="no-keys">You have no API keys yet.</p>'
    )
    full = len(view["keys"]) >= view["max_keys"]
    create = (
        f'<p class="notice" id="keys-full">You have {view["max_keys"]} keys, the most an account can hold. '
        "Revoke or renew one instead.</p>"
        if full
        else f'<form method="post" action="/keys">{hidden_csrf(csrf)}'
        '<button type="submit" id="create-key">Create a new key</button></form>'
    )
    return (
        "<h1>API keys</h1>"
        f"<p>You can have up to {MAX_LIVE_KEYS} keys. We keep only a one-way hash of each key: the full key "
        "is shown once, when you create or renew it, and cannot be recovered. Lost a key? Renew it: the old "
        "key stops working at once.</p>"
        f'<section class="card">{table}{create}</section>'
    )


def new_key_body(new: dict[str, Any], *, renewed: bool) -> str:
    key = esc(new["key"])
    lead = "Your old key has stopped working. " if renewed else ""
    setups = "".join(
        f'<section class="card"><h2>{esc(s["tool"])}</h2><p>Put this in {esc(s["where"])}:</p>'
        f'<pre id="cfg-{esc(s["slug"])}">{html.escape(s["text"], quote=False)}</pre>'
        f'<button type="button" data-copy="cfg-{esc(s["slug"])}">Copy</button></section>'
        for s in new["setups"]
    )
    return (
        f"<h1>{'Your renewed API key' if renewed else 'Your new API key'}</h1>"
        f'<section class="card" aria-labelledby="key-h"><h2 id="key-h">Copy it now</h2>'
        f"<p><strong>{lead}This is the only time the full key is shown.</strong> We store only its hash.</p>"
        f'<p class="keyline"><code id="new-key">{key}</code> '
        '<button type="button" data-copy="new-key" id="copy-key">Copy key</button></p>'
        '<p class="copied" role="status" aria-live="polite"></p></section>'
        f"{setups}"
        '<p><a href="/keys">Done: back to API keys</a></p>'
    )


def usage_body(page: dict[str, Any], daily: dict[str, Any], *, first_page: bool) -> str:
    cur = page["currency"]
    rows = []
    for r in page["rows"]:
        rows.append(
            f"<tr><td>{date_of(r['finished_at'])}</td><td>{esc(r['model'])}</td><td>{esc(r['status'])}</td>"
            f'<td class="num">{int(r["input_cache_hit_tokens"])}</td>'
            f'<td class="num">{int(r["input_cache_miss_tokens"])}</td>'
            f'<td class="num">{int(r["output_tokens"])}</td>'
            f'<td class="num">{money(int(r["charge_micro"]), cur, 6)}</td>'
            f"<td><code>{esc(r['request_id'])}</code></td></tr>"
        )
    table = (
        '<table id="usage-rows"><caption>Requests, newest first</caption><thead><tr>'
        '<th scope="col">Finished</th><th scope="col">Model</th><th scope="col">Status</th>'
        '<th scope="col">Input (cache hit)</th><th scope="col">Input (cache miss)</th>'
        '<th scope="col">Output</th><th scope="col">Charge</th><th scope="col">Request id</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p id="no-usage">No requests yet. Rows appear a few seconds after a request finishes.</p>'
    )
    pager = []
    if not first_page:
        pager.append('<a href="/usage">Newest</a>')
    if page["next_before"] is not None:
        pager.append(f'<a href="/usage?before={int(page["next_before"])}" rel="next">Older requests</a>')
    return (
        "<h1>Usage</h1>"
        f'<section class="card"><h2>Last {int(daily["days"])} days</h2>{daily_chart(daily["totals"], cur)}</section>'
        '<section class="card"><h2>Export</h2><p>Your whole metering history (token counts, model, charge, '
        "buckets drawn, timestamps; never any content):</p>"
        '<p><a class="button" id="export-csv" href="/api/usage/export?format=csv" download>Download CSV</a> '
        '<a class="button" id="export-json" href="/api/usage/export?format=json" download>Download JSON</a></p>'
        "</section>"
        f'<section class="card">{table}<nav class="pager" aria-label="Pages">{" ".join(pager)}</nav></section>'
    )


_KINDS = {"credit": "Credit", "topup": "Top-up not credited", "refund": "Refund", "forfeit": "Forfeited"}


def history_body(page: dict[str, Any], *, first_page: bool) -> str:
    cur = page["currency"]
    rows = []
    for r in page["rows"]:
        delta = int(r["delta_micro"])
        sign = "+" if delta > 0 else "−" if delta < 0 else ""
        rows.append(
            f'<tr data-event-id="{esc(r["event_id"])}"><td>{date_of(r["at"])}</td>'
            f"<td>{esc(_KINDS.get(r['kind'], r['kind']))}</td><td>{esc(r['status'])}</td>"
            f'<td class="num">{money(int(r["amount_micro"]), cur, 6)}</td>'
            f'<td class="num">{sign}{money(abs(delta), cur, 6)}</td>'
            f"<td>{esc(r['description'])}</td></tr>"
        )
    table = (
        '<table id="history-rows"><caption>Money events, newest first</caption><thead><tr>'
        '<th scope="col">When</th><th scope="col">Event</th><th scope="col">Status</th>'
        '<th scope="col">Amount</th><th scope="col">Effect on credit</th><th scope="col">Details</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p id="no-history">No credit yet. Events appear a few seconds after they happen.</p>'
    )
    pager = []
    if not first_page:
        pager.append('<a href="/history">Newest</a>')
    if page["next_before"] is not None:
        pager.append(
            f'<a href="/history?before={esc(quote(page["next_before"], safe=""))}" rel="next">Older events</a>'
        )
    return (
        "<h1>Credit history</h1>"
        "<p>Every change to your credit except requests (those are on the "
        '<a href="/usage">Usage</a> page): credits, top-ups that were not credited, refunds and '
        "forfeited credit. A refund the payment provider refused changed nothing.</p>"
        '<section class="card"><h2>Export</h2><p>Your whole credit history (ids, amounts, statuses, '
        "timestamps; no personal data):</p>"
        '<p><a class="button" id="history-export-csv" href="/api/history/export?format=csv" download>'
        "Download CSV</a> "
        '<a class="button" id="history-export-json" href="/api/history/export?format=json" download>'
        "Download JSON</a></p></section>"
        f'<section class="card">{table}<nav class="pager" aria-label="Pages">{" ".join(pager)}</nav></section>'
    )


def account_body(view: dict[str, Any], csrf: str) -> str:
    cur = view["currency"]
    threshold = view["low_threshold_micro"]
    current = f"currently {money(threshold, cur)}" if threshold else "currently off"
    return (
        "<h1>Account</h1>"
        f'<section class="card"><h2>You</h2><dl><dt>Email</dt><dd id="email">{esc(view["email"])}</dd>'
        f"<dt>Account id</dt><dd><code>{esc(view['account_id'])}</code></dd></dl></section>"
        '<section class="card"><h2>Low-balance alert</h2>'
        f"<p>Show a warning here and report <code>low_balance: true</code> on <code>/v1/balance</code> when "
        f"your balance drops below this amount ({current}; 0 switches it off).</p>"
        f'<form method="post" action="/account/low-balance">{hidden_csrf(csrf)}'
        f'<label for="amount">Threshold ({esc(cur)})</label> '
        f'<input id="amount" name="amount" inputmode="decimal" value="{esc(format_micro(threshold))}" required> '
        '<button type="submit">Save</button></form></section>'
        '<section class="card danger-zone" aria-labelledby="close-h"><h2 id="close-h">Close your account</h2>'
        "<ul><li>Your API keys stop working at once and you are signed out.</li>"
        "<li>Your email and Google account identifier are erased. Transaction and metering records are kept "
        "for accounting, under the account id only.</li>"
        "<li>Unused, unexpired top-up credit is <strong>refunded to your card first</strong> (see the "
        '<a href="/topup" id="refund-first">Top up</a> page). Whatever is left after that '
        f"(grants, trial credit, fractions of a satang; now at most {money(view['available_micro'], cur)}) "
        "is forfeited.</li>"
        '<li>Export your usage and <a href="/history">credit history</a> first if you want to keep them. '
        "Signing in again later makes a new, empty account.</li></ul>"
        f'<form method="post" action="/account/close">{hidden_csrf(csrf)}'
        '<p><input type="checkbox" id="confirm" name="confirm" value="yes" required> '
        '<label for="confirm">I understand; close my account</label></p>'
        '<button type="submit" class="danger" id="close-account">Close account</button></form></section>'
    )


def closed_body(result: dict[str, Any]) -> str:
    return (
        '<section class="card" role="status"><h1>Your account is closed</h1>'
        f"<p>{int(result['keys_revoked'])} API key(s) revoked; you are signed out; your email and Google "
        'identifier are erased.</p><p><a href="/">Start page</a></p></section>'
    )
