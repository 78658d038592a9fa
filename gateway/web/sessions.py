"""Browser sessions: an encrypted cookie (aiohttp-session), bounded lifetime, ended at sign-out.

The cookie holds ids only: ``account_id``, ``iat`` (when sign-in happened), ``sid`` (a random id
that sign-out records as ended, so a copy of the cookie stops working too) and the CSRF token.
Never the email, never anything from the identity provider.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp_session import AbstractStorage, Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet

from ledger.keys import shard_of

from ..appkeys import LEDGER, REDIS, SETTINGS
from ..settings import Settings

__all__ = [
    "SESSION_MAX_AGE_S",
    "current_account",
    "end_session",
    "fernet_for",
    "get_session",
    "new_session",
    "session_cookie_name",
    "sessions_middleware",
    "start_session",
]

SESSION_MAX_AGE_S = 7 * 24 * 3600
# Routes that never touch the session: the coding-tool API streams, and probes stay cheap.
_NO_SESSION_PREFIXES = ("/v1/", "/_demo/", "/static/")
_NO_SESSION_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STORAGE = web.RequestKey("web_session_storage", AbstractStorage)
_SESSION = web.RequestKey("web_session", Session)
_ACCOUNT = web.RequestKey("web_account", str)


def fernet_for(secret: bytes) -> Fernet:
    """The cookie key: SHA-256 of SESSION_SECRET (any length in, exactly 32 bytes out)."""
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"coding-plan session v1:" + secret).digest()))


def session_cookie_name(settings: Settings) -> str:
    # SECURITY: the __Host- prefix makes browsers insist on Secure, Path=/ and no Domain.
    return "__Host-cp_session" if settings.cookie_secure else "cp_session"


def sessions_middleware(settings: Settings) -> Middleware:
    """aiohttp-session's encrypted cookie storage behind our own small middleware: it keeps its state
    under typed request keys (aiohttp warns about string keys) and skips the streamed /v1 routes."""
    storage = EncryptedCookieStorage(
        fernet_for(settings.session_secret),
        cookie_name=session_cookie_name(settings),
        max_age=SESSION_MAX_AGE_S,
        secure=settings.cookie_secure,
        httponly=True,
        samesite="Lax",
        path="/",
    )

    @web.middleware
    async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(_NO_SESSION_PREFIXES) or path in _NO_SESSION_PATHS:
            return await handler(request)
        request[_STORAGE] = storage
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            await _save(request, exc)
            raise
        if isinstance(response, web.Response) and not response.prepared:
            await _save(request, response)
        return response

    return sessions


async def _save(request: web.Request, response: web.StreamResponse) -> None:
    session = request.get(_SESSION)
    # Session keeps "changed" private; aiohttp-session's own middleware reads it the same way.
    if session is not None and session._changed:
        await request[_STORAGE].save_session(request, response, session)


async def get_session(request: web.Request) -> Session:
    """This request's session (loaded from the cookie once)."""
    session = request.get(_SESSION)
    if session is None:
        session = await request[_STORAGE].load_session(request)
        request[_SESSION] = session
    return session


async def new_session(request: web.Request) -> Session:
    """A fresh, empty session replacing whatever the cookie held."""
    session = await request[_STORAGE].new_session()
    request[_SESSION] = session
    return session


def _ended_key(request: web.Request, sid: str) -> str:
    return f"{request.app[SETTINGS].ledger_prefix}:web:ended:{sid}"


async def start_session(request: web.Request, account_id: str) -> Session:
    """Sign in: a brand-new session (new cookie contents, new CSRF token) against session fixation."""
    session = await new_session(request)
    session["account_id"] = account_id
    session["iat"] = int(request.app[LEDGER].clock())
    # The ledger's epoch at sign-in: the list of ended sessions lives in Redis, so a session must not
    # outlive the Redis data that could say it was signed out (a rebuild writes a new epoch).
    session["ep"] = await _epoch_of(request, account_id)
    session["sid"] = secrets.token_urlsafe(18)
    session["csrf"] = secrets.token_urlsafe(32)
    return session


async def _epoch_of(request: web.Request, account_id: str) -> str:
    ledger = request.app[LEDGER]
    got: str | None = await ledger.redis.get(ledger.keys.epoch(shard_of(account_id)))
    return got or ""


async def end_session(request: web.Request) -> None:
    """Sign out: record the session id as ended (for a copy of the cookie) and clear the cookie."""
    session = await get_session(request)
    sid = session.get("sid")
    if isinstance(sid, str) and sid:
        await request.app[REDIS].set(_ended_key(request, sid), "1", ex=SESSION_MAX_AGE_S + 60)
    session.invalidate()


async def current_account(request: web.Request) -> str | None:
    """The signed-in, still open account of this request, or None (a stale session is cleared)."""
    if _ACCOUNT in request:
        cached = request[_ACCOUNT]
        return cached or None
    account_id = await _check(request)
    request[_ACCOUNT] = account_id or ""
    return account_id


async def _check(request: web.Request) -> str | None:
    session = await get_session(request)
    account_id, iat, sid = session.get("account_id"), session.get("iat"), session.get("sid")
    if account_id is None:
        return None
    now = request.app[LEDGER].clock()
    valid = (
        isinstance(account_id, str)
        and isinstance(iat, int)
        and isinstance(sid, str)
        # SECURITY: an absolute lifetime from sign-in; the cookie's own max-age slides with use.
        and iat - 60 <= now < iat + SESSION_MAX_AGE_S
    )
    if valid and await request.app[REDIS].exists(_ended_key(request, str(sid))):
        valid = False
    if valid and session.get("ep") != await _epoch_of(request, str(account_id)):
        valid = False  # signed in before the ledger was lost and rebuilt: sign in again
    if valid:
        info = await request.app[LEDGER].account(str(account_id))
        valid = info is not None and info.status == "active"
    if not valid:
        session.invalidate()
        return None
    return str(account_id)
