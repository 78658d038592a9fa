"""The top-up page (card via Omise.js, PromptPay QR), the 3-D Secure return page, and refund forms."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

from ledger import errors as LE
from ledger.ledger import BucketInfo, Topup
from ledger.money import format_micro, iso_ms

from .. import errors as E
from ..appkeys import LEDGER, SETTINGS
from ..middlewares import ledger_to_gateway
from ..omise_api import OmiseUnavailable
from ..settings import Settings
from ..web import check_csrf, csrf_token, current_account
from ..web.csrf import CSRF_FIELD
from ..web.render import date_of, esc, hidden_csrf, html_response, layout, message_page, money
from .amounts import micro_per_minor
from .api import parse_refund_amount
from .config import PAYMENTS, omise_js_url, omise_origins
from .service import TOPUP_REFERENCE_PREFIX, Payments

__all__ = ["page_routes", "refundable_micro"]

EXPIRY_WARNING_MS: Final = 7 * 24 * 3600 * 1000
# Read once at import: no file I/O on the event loop per request.
_SCRIPT: Final = (Path(__file__).with_name("static") / "topup.js").read_bytes()
_SOURCES: Final = {"topup": "Top-up", "trial": "Trial credit", "grant": "Grant"}
_STATUS_TEXT: Final = {
    "pending": "Waiting for payment",
    "successful": "Paid",
    "failed": "Failed",
    "expired": "Expired",
}


def refundable_micro(b: BucketInfo, now_ms: int, currency: str) -> int:
    """What a refund of this bucket would pay back now: unused, unexpired top-up credit in whole satang."""
    if b.source != "topup" or not b.reference.startswith(TOPUP_REFERENCE_PREFIX) or b.expires_at <= now_ms:
        return 0
    per = micro_per_minor(currency)
    return (b.remaining_micro // per) * per


def _csp(settings: Settings) -> str:
    # SECURITY: the site's own CSP, widened only by Omise's script, token vault and QR image hosts.
    o = omise_origins(settings)
    return (
        f"default-src 'none'; script-src 'self' {o['script']}; style-src 'self'; "
        f"img-src 'self' data: {o['api']}; connect-src 'self' {o['vault']}; frame-src {o['vault']}; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


async def _page(
    request: web.Request, title: str, body: str, *, status: int = 200, refresh_s: int = 0
) -> web.Response:
    csrf = await csrf_token(request)
    page = layout(title, body, signed_in=True, csrf=csrf, active="/topup")
    if refresh_s:
        # A pending payment: the page looks again by itself (no inline script is allowed).
        page = page.replace("<head>", f'<head><meta http-equiv="refresh" content="{refresh_s}">', 1)
    resp = html_response(page, status=status)
    resp.headers["Content-Security-Policy"] = _csp(request.app[SETTINGS])
    return resp


def _error_page(err: Exception) -> web.Response:
    gw = ledger_to_gateway(err) if isinstance(err, LE.LedgerError) else err
    assert isinstance(gw, E.GatewayError)
    return message_page(
        "Refund not possible" if gw.status == 409 else "Something went wrong",
        gw.message,
        status=gw.status,
        links=(("/topup", "Back to top-ups"),),
    )


def _not_configured() -> str:
    return (
        "<h1>Top up</h1>"
        '<p class="notice" id="topup-unconfigured">Top-ups are not configured on this server '
        "(OMISE_PUBLIC_KEY and OMISE_SECRET_KEY are not set).</p>"
    )


def _topup_form(settings: Settings, currency: str) -> str:
    presets = "".join(
        f'<label class="preset"><input type="radio" name="preset" value="{int(p)}"{" checked" if i == 0 else ""}> '
        f"{int(p)} {esc(currency)}</label> "
        for i, p in enumerate(settings.topup_presets)
        if settings.topup_min <= p <= settings.topup_max
    )
    # SECURITY: the card inputs have no name attribute: they are never submitted to us, only read
    # by Omise.js, which sends them to Omise's vault and hands us a single-use token id.
    return (
        '<section class="card" aria-labelledby="topup-h"><h2 id="topup-h">Buy credit</h2>'
        f'<form id="topup-form" data-public-key="{esc(settings.omise_public_key)}" data-currency="{esc(currency)}" '
        f'data-min="{settings.topup_min}" data-max="{settings.topup_max}">'
        f"<fieldset><legend>Amount ({esc(currency)})</legend>{presets}<br>"
        f'<label for="custom-amount">Other amount ({settings.topup_min} to {settings.topup_max})</label> '
        f'<input id="custom-amount" inputmode="decimal" autocomplete="off"></fieldset>'
        "<fieldset><legend>Card</legend>"
        '<label for="card-name">Name on card</label> <input id="card-name" autocomplete="cc-name"><br>'
        '<label for="card-number">Card number</label> <input id="card-number" inputmode="numeric" autocomplete="cc-number"><br>'
        '<label for="card-exp-month">Expiry month</label> <input id="card-exp-month" inputmode="numeric" size="2" autocomplete="cc-exp-month"> '
        '<label for="card-exp-year">year</label> <input id="card-exp-year" inputmode="numeric" size="4" autocomplete="cc-exp-year"> '
        '<label for="card-cvc">CVC</label> <input id="card-cvc" inputmode="numeric" size="4" autocomplete="cc-csc"><br>'
        '<button type="submit" id="pay-card">Pay by card</button></fieldset>'
        '<p>or <button type="button" id="pay-promptpay">Pay with PromptPay QR</button></p>'
        "</form>"
        '<p id="topup-status" role="status" aria-live="polite"></p>'
        '<div id="promptpay-qr" hidden><p>Scan with your banking app; this page updates when the payment arrives.</p>'
        '<img id="qr-image" alt="PromptPay QR code" width="240" height="240"></div>'
        '<p class="muted">Card details go straight to Omise (Opn Payments); we never see or store them. '
        "Each top-up becomes a credit bucket that expires 30 days later. Unused credit is refundable "
        "until then.</p></section>"
    )


def _buckets(buckets: list[BucketInfo], now: int, currency: str, csrf: str) -> str:
    rows = []
    for b in sorted(buckets, key=lambda b: (b.expires_at, b.bucket_id)):
        expired = b.expires_at <= now
        soon = not expired and b.remaining_micro > 0 and b.expires_at - now <= EXPIRY_WARNING_MS
        refundable = refundable_micro(b, now, currency)
        if refundable:
            action = (
                f'<form method="post" action="/topup/buckets/{esc(b.bucket_id)}/refund" class="inline">'
                f'{hidden_csrf(csrf)}<button type="submit" class="refund" data-bucket="{esc(b.bucket_id)}" '
                f'aria-label="Refund {format_micro(refundable)} {esc(currency)}">Refund {money(refundable, currency)}'
                "</button></form>"
            )
        elif expired:
            action = "Expired: not refundable"
        elif b.source != "topup":
            action = "Not refundable"
        else:
            action = "Used up"
        state = "expired" if expired else "expires soon" if soon else "active"
        rows.append(
            f'<tr id="bucket-{esc(b.bucket_id)}" class="{state.replace(" ", "-")}"><td>{esc(_SOURCES.get(b.source, b.source))}</td>'
            f'<td class="num">{money(b.amount_micro, currency)}</td>'
            f'<td class="num remaining">{money(0 if expired else b.remaining_micro, currency)}</td>'
            f"<td>{date_of(iso_ms(b.expires_at))}</td><td>{esc(state)}</td><td>{action}</td></tr>"
        )
    if not rows:
        return '<section class="card"><h2>Your credit</h2><p id="no-buckets">No credit yet.</p></section>'
    return (
        '<section class="card"><h2>Your credit</h2><table id="topup-buckets"><thead><tr>'
        '<th scope="col">Source</th><th scope="col">Amount</th><th scope="col">Remaining</th>'
        '<th scope="col">Expires</th><th scope="col">State</th><th scope="col">Refund</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table><p class="muted">Consumed and expired credit is not '
        "refundable; a refund pays back whole satang.</p></section>"
    )


def _warnings(buckets: list[BucketInfo], now: int, currency: str) -> str:
    items = [
        f'<li class="warn-expiry">{money(b.remaining_micro, currency)} expires on '
        f"{date_of(iso_ms(b.expires_at))}; unused credit is forfeited at expiry.</li>"
        for b in buckets
        if b.remaining_micro > 0 and now < b.expires_at <= now + EXPIRY_WARNING_MS
    ]
    if not items:
        return ""
    return f'<section class="warnings" role="alert"><ul>{"".join(items)}</ul></section>'


def _history(topups: list[Topup], currency: str) -> str:
    if not topups:
        return ""
    rows = []
    for t in topups:
        reason = esc(t.failure_message) if t.status in ("failed", "expired") else ""
        rows.append(
            f'<tr data-topup="{esc(t.topup_id)}"><td>{date_of(iso_ms(t.created_at))}</td>'
            f'<td class="num">{money(t.amount_micro, currency)}</td><td>{esc(t.method)}</td>'
            f'<td class="status">{esc(_STATUS_TEXT.get(t.status, t.status))}</td><td>{reason}</td></tr>'
        )
    return (
        '<section class="card"><h2>Top-up history</h2><table id="topup-history"><thead><tr>'
        '<th scope="col">Started</th><th scope="col">Amount</th><th scope="col">Method</th>'
        f'<th scope="col">Status</th><th scope="col">Reason</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>'
    )


async def topup_page(request: web.Request) -> web.Response:
    account_id = await current_account(request)
    if account_id is None:
        return web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
    payments: Payments = request.app[PAYMENTS]
    settings = request.app[SETTINGS]
    ledger = request.app[LEDGER]
    now = ledger.now_ms()
    buckets = await ledger.buckets(account_id)
    cur = payments.currency
    if not payments.enabled:
        body = _not_configured()
    else:
        body = (
            f"<h1>Top up</h1>{_warnings(buckets, now, cur)}{_topup_form(settings, cur)}"
            f'<script src="{esc(omise_js_url(settings))}"></script>'
            '<script src="/payments/topup.js" defer></script>'
        )
    body += _buckets(buckets, now, cur, await csrf_token(request))
    body += _history(await ledger.topups(account_id, limit=20), cur)
    return await _page(request, "Top up", body)


async def return_page(request: web.Request) -> web.Response:
    """Where 3-D Secure (and PromptPay) send the payer back: ask Omise now, show the outcome."""
    payments: Payments = request.app[PAYMENTS]
    ledger = request.app[LEDGER]
    topup = await ledger.topup(request.match_info["topup_id"])
    if topup is None or not payments.enabled:
        return message_page("Unknown top-up", "We have no such top-up.", status=404)
    qr = None
    if topup.status == "pending" and topup.charge_id:
        try:
            charge = await payments.omise.retrieve_charge(topup.charge_id)
            topup = await payments.settle_charge(charge)
            qr = charge.qr_uri
        except (OmiseUnavailable, E.NotFound):
            pass  # show what we know; the webhook or the sync settles it
    account_id = await current_account(request)
    if account_id != topup.account_id:
        # Crediting above needed no session; the outcome is shown only to its owner.
        return message_page(
            "Payment received",
            "Sign in to see your top-up.",
            status=200,
            links=(("/", "Sign in"),),
        )
    cur = payments.currency
    amount = money(topup.amount_micro, cur)
    back = '<p><a class="button" id="back-to-dashboard" href="/">Back to your dashboard</a> <a href="/topup">Top-ups</a></p>'
    if topup.status == "successful":
        bucket = await ledger.bucket(topup.bucket_id)
        expires = date_of(iso_ms(bucket.expires_at)) if bucket else "&mdash;"
        body = (
            f'<section class="card" role="status"><h1 id="topup-outcome" data-status="successful">Top-up successful</h1>'
            f"<p>{amount} was added to your balance. This credit expires on {expires}.</p>{back}</section>"
        )
        return await _page(request, "Top-up successful", body)
    if topup.status == "pending":
        qr_html = (
            f'<p><img src="{esc(qr)}" alt="PromptPay QR code" width="240" height="240"></p>' if qr else ""
        )
        body = (
            f'<section class="card" role="status"><h1 id="topup-outcome" data-status="pending">Waiting for the payment</h1>'
            f"<p>Your top-up of {amount} is not confirmed yet. This page checks again every few seconds.</p>"
            f"{qr_html}{back}</section>"
        )
        return await _page(request, "Waiting for payment", body, refresh_s=5)
    body = (
        f'<section class="card" role="alert"><h1 id="topup-outcome" data-status="{esc(topup.status)}">'
        f"Top-up {esc(topup.status)}</h1><p>Your top-up of {amount} did not go through. Omise says: "
        f'<span id="failure-message">{esc(topup.failure_message or topup.status)}</span> '
        f'(<code id="failure-code">{esc(topup.failure_code)}</code>).</p>'
        f"<p>Nothing was credited.</p>{back}</section>"
    )
    return await _page(request, "Top-up failed", body)


async def refund_form(request: web.Request) -> web.Response:
    account_id = await current_account(request)
    if account_id is None:
        return message_page("Signed out", "Your session has ended; please sign in again.", status=401)
    payments: Payments = request.app[PAYMENTS]
    try:
        data = await request.post()
        await check_csrf(request, str(data.get(CSRF_FIELD, "")))
        if not payments.enabled:
            raise E.ServiceUnavailable("Refunds are not configured on this server (Omise keys are not set).")
        amount = parse_refund_amount(str(data.get("amount", "")) or None)
        outcome = await payments.refund_bucket(
            account_id, request.match_info["bucket_id"], amount_micro=amount
        )
    except (LE.LedgerError, E.GatewayError) as err:
        return _error_page(err)
    cur = payments.currency
    amount_text = money(outcome.amount_micro, cur)
    back = '<p><a href="/topup" id="back-to-topups">Back to top-ups</a> <a href="/">Dashboard</a></p>'
    if outcome.status == "confirmed":
        body = (
            f'<section class="card" role="status"><h1 id="refund-outcome" data-status="confirmed">Refund on its way</h1>'
            f"<p>{amount_text} is being refunded to your card or account by Omise.</p>{back}</section>"
        )
        return await _page(request, "Refund on its way", body)
    if outcome.status == "processing":
        body = (
            f'<section class="card" role="status"><h1 id="refund-outcome" data-status="processing">Refund requested</h1>'
            f"<p>{amount_text} has left your balance; Omise has not confirmed the refund yet. We retry "
            f"automatically.</p>{back}</section>"
        )
        return await _page(request, "Refund requested", body, status=202)
    body = (
        f'<section class="card" role="alert"><h1 id="refund-outcome" data-status="reverted">Refund refused</h1>'
        f'<p>Omise refused the refund: <span id="failure-message">{esc(outcome.failure_message)}</span> '
        f"(<code>{esc(outcome.failure_code)}</code>). Your credit is back in its bucket.</p>{back}</section>"
    )
    return await _page(request, "Refund refused", body, status=409)


async def topup_script(request: web.Request) -> web.Response:
    return web.Response(
        body=_SCRIPT,
        content_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


def page_routes() -> list[web.RouteDef]:
    return [
        web.get("/topup", topup_page, allow_head=False),
        web.get("/topups/{topup_id}/return", return_page, allow_head=False),
        web.post("/topup/buckets/{bucket_id}/refund", refund_form),
        web.get("/payments/topup.js", topup_script, allow_head=False),
    ]
