"""API-key authentication for the coding-tool routes: ``Authorization: Bearer`` or ``x-api-key``."""

from __future__ import annotations

from aiohttp import web

from ledger.keys import API_KEY_PREFIX
from ledger.ledger import KeyRef, Ledger

from . import errors as E

__all__ = ["api_key_from", "authenticate"]

_MAX_KEY_LEN = 128


def api_key_from(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = request.headers.get("x-api-key", "").strip()
    return key or None


async def authenticate(request: web.Request, ledger: Ledger) -> KeyRef:
    key = api_key_from(request)
    if key is None:
        raise E.Unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
        )
    if not key.startswith(API_KEY_PREFIX) or len(key) > _MAX_KEY_LEN:
        raise E.Unauthorized("Invalid API key. Keys start with 'cpk_'; create one on the dashboard.")
    ref = await ledger.lookup_key(key)
    if ref is None:
        raise E.Unauthorized("Invalid or revoked API key. Create or renew a key on the dashboard.")
    return ref
