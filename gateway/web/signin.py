"""Sign-in and sign-out: Google (OIDC) routes, the embedded demo sign-in, and the shared consumed-state store."""

from __future__ import annotations

import hashlib
import logging

from aiohttp import web
from redis.asyncio import Redis

from .. import errors as E
from ..appkeys import DEMO, LEDGER, SETTINGS
from ..limits import is_local_client
from ..oidc import OIDCClient, PendingSignIn, SignInError
from .csrf import CSRF_FIELD, check_csrf
from .render import message_page
from .sessions import end_session, get_session, start_session

__all__ = ["OIDC", "RedisStateStore", "demo_available", "signin_routes"]

log = logging.getLogger("gateway.web.signin")

# Set in setup_web's cleanup context when Google sign-in is configured.
OIDC = web.AppKey("oidc", OIDCClient)

_PENDING = "oidc_pending"


class RedisStateStore:
    """Consumed OIDC states shared by every web process: ``SET key 1 NX EX ttl`` on the ledger's Redis."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

    async def consume(self, state: str, ttl_s: int) -> bool:
        # Hashed: the key names only that a state was used, not the state itself.
        digest = hashlib.sha256(state.encode()).hexdigest()
        return bool(await self._redis.set(f"{self._prefix}:web:oidc_state:{digest}", "1", nx=True, ex=ttl_s))


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def demo_available(app: web.Application) -> bool:
    """The local demo sign-in: only in the embedded default, only while Google is not configured."""
    settings = app[SETTINGS]
    return settings.embedded and not settings.google_enabled and app.get(DEMO) is not None


def _refusal(error: SignInError) -> web.Response:
    return message_page(
        "Sign-in failed",
        error.message,
        status=error.status,
        links=(("/auth/google", "Try signing in again"), ("/", "Back to the start page")),
        reason=error.reason,
    )


async def begin(request: web.Request) -> web.Response:
    client = request.app.get(OIDC)
    if client is None:
        return message_page(
            "Sign-in is not configured", "Google sign-in is not configured on this server.", status=503
        )
    try:
        url, pending = await client.begin()
    except SignInError as error:
        return _refusal(error)
    session = await get_session(request)
    session[_PENDING] = pending.as_dict()
    return _redirect(url)


async def callback(request: web.Request) -> web.Response:
    client = request.app.get(OIDC)
    if client is None:
        return message_page(
            "Sign-in is not configured", "Google sign-in is not configured on this server.", status=503
        )
    session = await get_session(request)
    # Popped first: whatever happens next, this pending sign-in cannot be used again from this cookie.
    data = session.pop(_PENDING, None)
    try:
        if data is None:
            raise SignInError("state_mismatch")
        identity = await client.complete(PendingSignIn.from_dict(data), request.query)
    except SignInError as error:
        log.info("sign-in refused reason=%s", error.reason)
        # SECURITY: a refused sign-in never leaves a signed-in session behind.
        session.invalidate()
        return _refusal(error)
    account_id = await _account_for(request, identity.email, identity.sub)
    await start_session(request, account_id)
    log.info("signed in account=%s", account_id)
    return _redirect("/")


async def _account_for(request: web.Request, email: str, sub: str) -> str:
    """Find the account by Google's stable sub; the first sign-in makes it (and grants any trial credit)."""
    settings = request.app[SETTINGS]
    ledger = request.app[LEDGER]
    account_id, created = await ledger.create_account(
        email, sub=sub, low_threshold_micro=settings.low_balance_default_micro
    )
    if not created:
        info = await ledger.account(account_id)
        if info is not None and info.status == "active" and info.email != email:
            await ledger.set_email(account_id, email)  # the address changed at Google; same account
    elif settings.trial_credit_micro > 0:
        # Idempotent on the reference: one trial per account, however often this runs.
        await ledger.credit(
            account_id,
            settings.trial_credit_micro,
            reference=f"trial:{account_id}",
            source="trial",
            life_s=settings.trial_life_s,
        )
    return account_id


async def demo_signin(request: web.Request) -> web.Response:
    if not demo_available(request.app):
        raise web.HTTPNotFound()
    if not is_local_client(request):
        # SECURITY: the demo account is anyone's who reaches this; only someone on this machine.
        return message_page("Request refused", "The demo sign-in works only from this machine.", status=403)
    form = await request.post()
    try:
        await check_csrf(request, str(form.get(CSRF_FIELD, "")))
    except E.Forbidden as err:
        return message_page("Request refused", err.message, status=403)
    account_id, _key = request.app[DEMO]
    await start_session(request, account_id)
    return _redirect("/")


async def logout(request: web.Request) -> web.Response:
    form = await request.post()
    try:
        await check_csrf(request, str(form.get(CSRF_FIELD, "")))
    except E.Forbidden as err:
        return message_page("Request refused", err.message, status=403)
    await end_session(request)
    return _redirect("/")


def signin_routes() -> list[web.RouteDef]:
    return [
        web.get("/auth/google", begin, allow_head=False),
        web.get("/auth/google/callback", callback, allow_head=False),
        web.post("/auth/logout", logout),
        web.post("/auth/demo", demo_signin),
    ]
