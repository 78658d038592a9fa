"""Top-ups with Omise, refunds of unused credit: set up by setup_payments."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup_payments"]


def setup_payments(app: web.Application) -> None:
    """Registers the top-up, refund and webhook routes (filled in by the payments work)."""
