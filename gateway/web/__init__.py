"""Pages and JSON API for people (sign-in, dashboard, keys, usage, account): set up by setup_web."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup_web"]


def setup_web(app: web.Application) -> None:
    """Registers the web routes and the session middleware (filled in by the accounts work)."""
