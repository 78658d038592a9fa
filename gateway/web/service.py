"""What the pages and the JSON API both do: each function takes the signed-in account and returns JSON-ready data."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ledger.ledger import MAX_LIVE_KEYS, NewKey
from ledger.money import iso_ms, parse_amount
from ledger.store import UNAVAILABLE

from .. import errors as E
from ..appkeys import LEDGER, REGISTRY, SETTINGS, STORE
from ..client_setup import CODEX_ENV_KEY, tool_setups

__all__ = [
    "EXPIRY_WARNING_S",
    "account_view",
    "close_account",
    "create_key",
    "daily_usage",
    "history_page",
    "keys_view",
    "parse_threshold",
    "renew_key",
    "revoke_key",
    "set_low_balance",
    "tool_config",
    "usage_page",
]

EXPIRY_WARNING_S = 7 * 24 * 3600
USAGE_PAGE_MAX = 200


async def account_view(request: web.Request, account_id: str) -> dict[str, Any]:
    """GET /api/account: balance, buckets and the warnings the overview shows."""
    ledger = request.app[LEDGER]
    info = await ledger.account(account_id)
    if info is None:
        raise E.NotFound("No such account.")
    bal = await ledger.balance(account_id)
    now = ledger.now_ms()
    buckets = []
    warnings: list[str] = []
    for b in sorted(bal.buckets, key=lambda b: (b.expires_at, b.bucket_id)):
        expired = b.expires_at <= now
        soon = not expired and b.remaining_micro > 0 and b.expires_at - now <= EXPIRY_WARNING_S * 1000
        buckets.append(
            {
                "bucket_id": b.bucket_id,
                "amount_micro": b.amount_micro,
                "remaining_micro": b.remaining_micro if not expired else 0,
                "expires_at": iso_ms(b.expires_at),
                "created_at": iso_ms(b.created_at),
                "expired": expired,
                "expiring_soon": soon,
                "source": b.source,
            }
        )
        if soon:
            warnings.append(f"bucket_expiring:{b.bucket_id}")
    if bal.low_balance:
        warnings.insert(0, "low_balance")
    return {
        "account_id": account_id,
        "email": info.email,
        "currency": request.app[REGISTRY].currency,
        "available_micro": bal.available_micro,
        "reserved_micro": bal.reserved_micro,
        "low_balance": bal.low_balance,
        "low_threshold_micro": bal.low_threshold_micro,
        "buckets": buckets,
        "warnings": warnings,
    }


async def keys_view(request: web.Request, account_id: str) -> dict[str, Any]:
    """GET /api/keys: prefixes and dates only; the full key is never kept, so never shown again."""
    keys = await request.app[LEDGER].list_keys(account_id)
    return {
        "keys": [
            {
                "key_id": k.key_id,
                "prefix": k.prefix,
                "created_at": iso_ms(k.created_at),
                "last_used_at": iso_ms(k.last_used_at),
            }
            for k in keys
        ],
        "max_keys": MAX_LIVE_KEYS,
    }


def tool_config(request: web.Request, key: str) -> dict[str, dict[str, str]]:
    """Ready-to-paste settings for Claude Code (Anthropic format), Codex and OpenAI-compatible tools."""
    base = request.app[SETTINGS].public_base_url
    return {
        "claude_code": {"ANTHROPIC_BASE_URL": base, "ANTHROPIC_AUTH_TOKEN": key},
        "openai": {"base_url": base + "/v1", "api_key": key},
        "codex": {"base_url": base + "/v1", "env_key": CODEX_ENV_KEY, "wire_api": "responses"},
    }


def tool_setup_texts(request: web.Request, key: str) -> list[dict[str, str]]:
    base = request.app[SETTINGS].public_base_url
    model = request.app[REGISTRY].suggested_model()
    return [
        {"tool": s.tool, "slug": s.slug, "where": s.where, "text": s.text}
        for s in tool_setups(base, key, model=model)
    ]


def _new_key_json(request: web.Request, new: NewKey, created_ms: int, replaces: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key_id": new.key_id,
        "key": new.key,
        "prefix": new.prefix,
        "created_at": iso_ms(created_ms),
        "config": tool_config(request, new.key),
        "setups": tool_setup_texts(request, new.key),
        "shown_once": True,
    }
    if replaces is not None:
        out["replaces"] = replaces
    return out


async def create_key(request: web.Request, account_id: str) -> dict[str, Any]:
    """POST /api/keys: the only response that holds the full key (KeyLimit -> 409 past two)."""
    ledger = request.app[LEDGER]
    new = await ledger.create_key(account_id)
    return _new_key_json(request, new, ledger.now_ms(), None)


async def _own_key(request: web.Request, account_id: str, key_id: str) -> None:
    # SECURITY: another account's key (or a revoked one) is "not found", never "forbidden".
    if await request.app[LEDGER].key_account(key_id) != account_id:
        raise E.NotFound("No such live key on this account.")


async def renew_key(request: web.Request, account_id: str, key_id: str) -> dict[str, Any]:
    """POST /api/keys/{key_id}/renew: a new key replaces the old one in one step; the old stops at once."""
    await _own_key(request, account_id, key_id)
    ledger = request.app[LEDGER]
    new = await ledger.create_key(account_id, replaces=key_id)
    return _new_key_json(request, new, ledger.now_ms(), key_id)


async def revoke_key(request: web.Request, account_id: str, key_id: str) -> dict[str, Any]:
    await _own_key(request, account_id, key_id)
    await request.app[LEDGER].revoke_key(key_id)
    return {"key_id": key_id, "revoked": True}


async def _read_store(request: web.Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except UNAVAILABLE:
        # The history file is missing or locked past its timeout (e.g. `ledger migrate` not run yet).
        raise E.ServiceUnavailable("Usage history is not available right now; try again shortly.") from None


async def usage_page(
    request: web.Request, account_id: str, *, limit: int = 50, before: int | None = None
) -> dict[str, Any]:
    """GET /api/usage: metering rows newest first; pass ``next_before`` as ``before`` for the next page."""
    limit = max(1, min(limit, USAGE_PAGE_MAX))
    rows: list[dict[str, Any]] = await _read_store(
        request, request.app[STORE].usage_rows, account_id, limit=limit, before=before
    )
    next_before = rows[-1]["seq"] if len(rows) == limit else None
    return {"rows": rows, "next_before": next_before, "currency": request.app[REGISTRY].currency}


async def history_page(
    request: web.Request, account_id: str, *, limit: int = 50, before: str | None = None
) -> dict[str, Any]:
    """GET /api/history: money events newest first; pass ``next_before`` as ``before`` for the next page."""
    limit = max(1, min(limit, USAGE_PAGE_MAX))
    try:
        rows: list[dict[str, Any]] = await _read_store(
            request, request.app[STORE].history_rows, account_id, limit=limit, before=before
        )
    except ValueError:
        raise E.BadRequest(
            "'before' must be a 'next_before' value from an earlier page.", param="before"
        ) from None
    next_before = rows[-1]["cursor"] if len(rows) == limit else None
    return {"rows": rows, "next_before": next_before, "currency": request.app[REGISTRY].currency}


async def daily_usage(request: web.Request, account_id: str, *, days: int = 30) -> dict[str, Any]:
    """Per-day (UTC) totals by model for the chart."""
    days = max(1, min(days, 366))
    rows: list[dict[str, Any]] = await _read_store(
        request, request.app[STORE].daily_totals, account_id, days, now_ms=request.app[LEDGER].now_ms()
    )
    return {"days": days, "totals": rows, "currency": request.app[REGISTRY].currency}


def parse_threshold(raw: object) -> int:
    """A low-balance threshold in currency units ("50", 50, "12.5"); 0 switches the alert off."""
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise E.BadRequest(
            "'amount' must be a string or an integer number of currency units.", param="amount"
        )
    text = str(raw).strip()
    if text in ("0", "0.0", "0.00"):
        return 0
    try:
        return parse_amount(text)
    except ValueError:
        raise E.BadRequest(
            "'amount' must be a positive amount with at most 6 decimals, or 0.", param="amount"
        ) from None


async def set_low_balance(request: web.Request, account_id: str, micro: int) -> dict[str, Any]:
    await request.app[LEDGER].set_low_threshold(account_id, micro)
    bal = await request.app[LEDGER].balance(account_id)
    return {"low_threshold_micro": micro, "low_balance": bal.low_balance}


async def close_account(request: web.Request, account_id: str) -> dict[str, Any]:
    """Close: unused, unexpired top-up credit refunded first (the policy makes it refundable), then
    every key revoked at once, email and sub dropped (Redis now, SQLite when the journal worker
    applies ``account_closed``); what is left (grants, trial credit, sub-satang remainders) is
    forfeited. A refund Omise refuses stops the closure, so no refundable money is lost."""
    from ..payments import PAYMENTS
    from ..payments.pages import refundable_micro

    ledger = request.app[LEDGER]
    payments = request.app.get(PAYMENTS)
    refunds: list[dict[str, Any]] = []
    if payments is not None and payments.enabled:
        now = ledger.now_ms()
        currency = request.app[REGISTRY].currency
        for b in await ledger.buckets(account_id):
            if refundable_micro(b, now, currency) <= 0:
                continue
            outcome = await payments.refund_bucket(account_id, b.bucket_id)
            if outcome.status == "reverted":
                raise E.Conflict(
                    f"Omise refused the refund of bucket {b.bucket_id} ({outcome.failure_message}); "
                    "the account is still open. Try again shortly."
                )
            refunds.append(outcome.as_json())
    forfeited, revoked = await ledger.close_account(account_id)
    return {
        "account_id": account_id,
        "closed": True,
        "refunds": refunds,
        "forfeited_micro": forfeited,
        "keys_revoked": revoked,
    }
