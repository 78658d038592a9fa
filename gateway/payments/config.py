"""What the payments routes share: the app key of the Payments service and Omise.js's address."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from ..omise_api import OMISE_API_BASE
from ..settings import Settings
from .service import Payments

__all__ = ["OMISE_JS_CDN", "OMISE_VAULT", "PAYMENTS", "omise_js_url", "omise_origins"]

PAYMENTS = web.AppKey("payments", Payments)

OMISE_JS_CDN: Final = "https://cdn.omise.co/omise.js"
OMISE_VAULT: Final = "https://vault.omise.co"


def omise_js_url(settings: Settings) -> str:
    """Omise.js from Omise's CDN in production. Pointed at another API (a local fake in tests), the
    script comes from that host too: ``OMISE_API_BASE/omise.js``. OMISE_JS_URL, when set, wins."""
    if settings.omise_js_url:
        return settings.omise_js_url
    if settings.omise_api_base.rstrip("/") == OMISE_API_BASE:
        return OMISE_JS_CDN
    return settings.omise_api_base.rstrip("/") + "/omise.js"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def omise_origins(settings: Settings) -> dict[str, str]:
    """Origins the top-up page may load from: the script's, the token vault's, the QR images'."""
    script = _origin(omise_js_url(settings))
    vault = OMISE_VAULT if script == _origin(OMISE_JS_CDN) else script
    return {"script": script, "vault": vault, "api": _origin(settings.omise_api_base)}
