"""JSON routes for top-ups and refunds (session + CSRF), and the Omise webhook (signature + re-fetch)."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ledger.money import parse_amount

from .. import errors as E
from ..appkeys import LEDGER, SETTINGS
from ..jsonbody import read_json_object
from ..omise_api import OmiseError, OmiseUnavailable, parse_event, verify_webhook_signature
from ..web import check_csrf, require_account
from ..web.api import json_response
from .amounts import parse_topup_amount
from .config import PAYMENTS, omise_js_url
from .service import Payments, topup_json

__all__ = ["api_routes", "parse_refund_amount", "topup_answer"]

log = logging.getLogger("gateway.payments.api")

_MAX_WEBHOOK_BYTES = 1 << 20
# Omise's webhook retries: a 2xx ends them, anything else is retried later.
_WEBHOOK_OK = {"received": True}


def _payments(request: web.Request) -> Payments:
    payments = request.app[PAYMENTS]
    if not payments.enabled:
        raise E.ServiceUnavailable("Top-ups are not configured on this server (Omise keys are not set).")
    return payments


def topup_answer(payments: Payments, topup: Any, charge: Any) -> dict[str, Any]:
    """POST /api/topups' answer: the top-up, plus where the payer goes next (3-D Secure or QR)."""
    out = topup_json(topup, currency=payments.currency)
    if charge is not None and topup.status == "pending":
        if charge.authorize_uri:
            out["authorize_uri"] = charge.authorize_uri
        if charge.qr_uri:
            out["qr"] = charge.qr_uri
    out["return_uri"] = payments.return_uri(topup.topup_id)
    return out


async def post_topups(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    payments = _payments(request)
    settings = request.app[SETTINGS]
    body = await read_json_object(request, required=False)
    if "amount" not in body:
        raise E.BadRequest("'amount' is required (currency units, e.g. 500).", param="amount")
    micro, minor = parse_topup_amount(
        body["amount"], payments.currency, minimum=settings.topup_min, maximum=settings.topup_max
    )
    token = body.get("token")
    method = body.get("method", "card")
    if method == "promptpay":
        if token is not None:
            raise E.BadRequest("PromptPay top-ups take no card 'token'.", param="token")
        chosen: str | None = None
    elif method == "card":
        if not isinstance(token, str) or not token:
            raise E.BadRequest("'token' (from Omise.js) is required for a card top-up.", param="token")
        chosen = token
    else:
        raise E.BadRequest('\'method\' must be "card" or "promptpay".', param="method")
    topup, charge = await payments.start_topup(account_id, micro, minor, token=chosen)
    return json_response(topup_answer(payments, topup, charge), status=201)


async def get_topups(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    payments = request.app[PAYMENTS]
    settings = request.app[SETTINGS]
    topups = await request.app[LEDGER].topups(account_id, limit=50)
    return json_response(
        {
            "enabled": payments.enabled,
            "currency": payments.currency,
            "presets": list(settings.topup_presets),
            "min": settings.topup_min,
            "max": settings.topup_max,
            "public_key": settings.omise_public_key if payments.enabled else None,
            "omise_js": omise_js_url(settings) if payments.enabled else None,
            "topups": [topup_json(t, currency=payments.currency) for t in topups],
        }
    )


async def get_topup(request: web.Request) -> web.Response:
    """One top-up; a pending one is asked about at Omise first (the PromptPay page polls this)."""
    account_id = await require_account(request)
    payments = _payments(request)
    topup = await request.app[LEDGER].topup(request.match_info["topup_id"])
    if topup is None or topup.account_id != account_id:
        raise E.NotFound("No such top-up on this account.")
    try:
        topup = await payments.refresh(topup)
    except OmiseUnavailable:
        pass  # show what we know; the next poll asks again
    return json_response(topup_json(topup, currency=payments.currency))


def parse_refund_amount(raw: object) -> int | None:
    """An optional partial refund amount in currency units; None = all unused credit."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise E.BadRequest("'amount' must be a number of currency units.", param="amount")
    try:
        return parse_amount(raw)
    except ValueError:
        raise E.BadRequest("'amount' must be a positive number of currency units.", param="amount") from None


async def post_refund(request: web.Request) -> web.Response:
    account_id = await require_account(request)
    await check_csrf(request)
    payments = _payments(request)
    body = await read_json_object(request, required=False)
    outcome = await payments.refund_bucket(
        account_id, request.match_info["bucket_id"], amount_micro=parse_refund_amount(body.get("amount"))
    )
    if outcome.status == "reverted":
        raise E.Conflict(f"Omise refused the refund ({outcome.failure_code}): {outcome.failure_message}")
    return json_response(outcome.as_json(), status=202 if outcome.status == "processing" else 200)


async def post_webhook(request: web.Request) -> web.Response:
    """Omise events. The body only names a charge: we fetch that charge from Omise and act on its answer."""
    payments = _payments(request)
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > _MAX_WEBHOOK_BYTES:
        raise E.PayloadTooLarge("Webhook body is too large.")
    raw = await request.content.read(_MAX_WEBHOOK_BYTES + 1)
    if len(raw) > _MAX_WEBHOOK_BYTES:
        raise E.PayloadTooLarge("Webhook body is too large.")
    if settings.omise_webhook_secret:
        # SECURITY: signed by Omise and fresh (replays older than the tolerance are refused).
        ok = verify_webhook_signature(
            settings.omise_webhook_secret,
            raw,
            request.headers.get("Omise-Signature", ""),
            request.headers.get("Omise-Signature-Timestamp", ""),
            now=request.app[LEDGER].clock(),
        )
        if not ok:
            log.warning("omise webhook with a bad or stale signature refused")
            raise E.Unauthorized("Webhook signature does not verify.")
    event = parse_event(raw)
    if not event.key.startswith("charge.") or event.charge_id is None:
        return json_response(_WEBHOOK_OK)
    try:
        # SECURITY: never the event's copy of the charge; Omise's own answer, now.
        charge = await payments.omise.retrieve_charge(event.charge_id)
    except OmiseUnavailable:
        raise E.ServiceUnavailable("Omise did not answer; deliver the event again later.") from None
    except OmiseError as exc:
        # Omise does not know the charge (a forged or foreign event): not ours, nothing to retry.
        log.info("omise webhook %s: charge unknown to Omise (%s)", event.key, exc.code)
        return json_response(_WEBHOOK_OK)
    try:
        topup = await payments.settle_charge(charge)
    except E.NotFound:
        return json_response(_WEBHOOK_OK)  # not one of our top-ups: nothing to retry
    log.info("omise webhook %s: charge %s -> topup %s %s", event.key, charge.id, topup.topup_id, topup.status)
    return json_response(_WEBHOOK_OK)


def api_routes() -> list[web.RouteDef]:
    return [
        web.post("/api/topups", post_topups),
        web.get("/api/topups", get_topups, allow_head=False),
        web.get("/api/topups/{topup_id}", get_topup, allow_head=False),
        web.post("/api/buckets/{bucket_id}/refund", post_refund),
        web.post("/webhooks/omise", post_webhook),
    ]
