"""Top-ups with Omise, refunds of unused credit: set up by setup_payments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from ..appkeys import HTTP, LEDGER, REGISTRY, SETTINGS, STORE
from ..omise_api import OmiseClient
from .api import api_routes
from .config import PAYMENTS, omise_js_url
from .pages import page_routes
from .service import Payments
from .sync import run_reconciler

__all__ = ["PAYMENTS", "Payments", "omise_js_url", "setup_payments"]


def setup_payments(app: web.Application) -> None:
    """Registers the top-up, refund and webhook routes; the Payments service and a background
    Omise reconciliation pass start with the app's resources (after the ledger and HTTP session)."""
    settings = app[SETTINGS]
    app.router.add_routes(api_routes())
    app.router.add_routes(page_routes())

    async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
        omise = None
        if settings.omise_enabled:
            assert settings.omise_secret_key is not None  # omise_enabled says so
            omise = OmiseClient(settings.omise_secret_key, app[HTTP], api_base=settings.omise_api_base)
        payments = Payments(
            app[LEDGER], omise, currency=app[REGISTRY].currency, public_base_url=settings.public_base_url
        )
        app[PAYMENTS] = payments
        stop = asyncio.Event()
        task = None
        if payments.enabled:
            task = asyncio.get_running_loop().create_task(
                run_reconciler(
                    payments,
                    stop,
                    lock_key=f"{settings.ledger_prefix}:payments:sync-lock",
                    store_factory=lambda: app.get(STORE),
                )
            )
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task

    app.cleanup_ctx.append(payments_ctx)
