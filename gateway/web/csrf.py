"""CSRF protection for every state-changing browser call: a per-session token plus an Origin check.

Forms send the token as the ``csrf_token`` field, scripts as the ``X-CSRF-Token`` header. The
cookie is SameSite=Lax already; the token is what stops a cross-site form POST on older browsers
and same-site attackers.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from aiohttp import web

from .. import errors as E
from ..appkeys import SETTINGS
from .sessions import get_session

__all__ = ["CSRF_FIELD", "CSRF_HEADER", "check_csrf", "csrf_token"]

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


async def csrf_token(request: web.Request) -> str:
    """This session's token, made on first use (the sign-in page needs one before sign-in too)."""
    session = await get_session(request)
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _origin_ok(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent by every client (scripts, older browsers): the token decides
    origin = origin.lower()
    allowed = {
        _origin_of(request.app[SETTINGS].public_base_url),
        f"{request.scheme}://{request.host}".lower(),
    }
    return origin in allowed


async def check_csrf(request: web.Request, form_token: str | None = None) -> None:
    """Raise Forbidden unless the request carries this session's token and, if any, our Origin."""
    if not _origin_ok(request):
        raise E.Forbidden("Cross-site request refused (Origin does not match this site).")
    sent = request.headers.get(CSRF_HEADER) or form_token or ""
    session = await get_session(request)
    expected = session.get("csrf")
    # SECURITY: constant-time compare; a missing session token never matches anything.
    if (
        not isinstance(expected, str)
        or not expected
        or not hmac.compare_digest(sent.encode(), expected.encode())
    ):
        raise E.Forbidden(f"Missing or wrong CSRF token (send the {CSRF_HEADER} header or the form field).")
