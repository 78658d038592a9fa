"""Pages and JSON API for people (sign-in, dashboard, keys, usage, account): set up by setup_web."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ..appkeys import HTTP, REDIS, SETTINGS
from ..oidc import OIDCClient
from .api import api_routes, require_account
from .csrf import check_csrf, csrf_token
from .pages import page_routes
from .sessions import current_account, sessions_middleware
from .signin import OIDC, RedisStateStore, signin_routes

__all__ = ["OIDC", "check_csrf", "csrf_token", "current_account", "require_account", "setup_web"]

STATIC_DIR = Path(__file__).with_name("static")


def setup_web(app: web.Application) -> None:
    """Registers the web routes and the session middleware. Call inside create_app, after the
    resources context (the OIDC client needs the app's HTTP session and Redis)."""
    settings = app[SETTINGS]
    # Inner to the error middleware, so refusals raised here still render as errors.
    app.middlewares.append(sessions_middleware(settings))
    app.router.add_routes(signin_routes())
    app.router.add_routes(api_routes())
    app.router.add_routes(page_routes())
    app.router.add_static("/static/", STATIC_DIR, append_version=False)

    async def oidc_client(app: web.Application) -> AsyncIterator[None]:
        if settings.google_enabled:
            assert settings.google_client_id and settings.google_client_secret  # google_enabled says so
            app[OIDC] = OIDCClient(
                settings.oidc_issuer,
                settings.google_client_id,
                settings.google_client_secret,
                settings.public_base_url + "/auth/google/callback",
                app[HTTP],
                state_store=RedisStateStore(app[REDIS], settings.ledger_prefix),
            )
        yield

    app.cleanup_ctx.append(oidc_client)
