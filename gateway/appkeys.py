"""Every resource the application shares, as typed ``web.AppKey``s, in one place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ledger.ledger import Ledger
from ledger.redis_client import AnyRedis
from ledger.store import Store

from .limits import AuthThrottle, KeySlots
from .metrics import Metrics
from .models import Registry
from .settings import Settings

if TYPE_CHECKING:
    from .proxy import Proxy

__all__ = [
    "AUTH_THROTTLE",
    "BACKGROUND",
    "COUNT_SLOTS",
    "DEMO",
    "HTTP",
    "LEDGER",
    "METRICS",
    "PROXY",
    "REDIS",
    "REGISTRY",
    "REQUEST_ID",
    "SETTINGS",
    "STORE",
]

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
# A single Redis or a Redis Cluster client (ledger/redis_client.py): single-key commands only.
REDIS: web.AppKey[AnyRedis] = web.AppKey("redis")
LEDGER = web.AppKey("ledger", Ledger)
# The SQLite history: read-only here, except in the embedded default where the worker runs in process.
STORE = web.AppKey("store", Store)
# One client session for every upstream and outside API (aiohttp's persistent-session advice).
HTTP = web.AppKey("http", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", Metrics)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy")
# Settlements and other work that must finish even when the request that started it is cancelled.
# Pending settlements (and releases): tasks, or a script lane's futures (gateway.proxy).
BACKGROUND = web.AppKey("background", set[asyncio.Future[Any]])
# Embedded default only: the demo account and its freshly issued key, for the start-up banner.
DEMO = web.AppKey("demo", tuple[str, str])
AUTH_THROTTLE = web.AppKey("auth_throttle", AuthThrottle)
COUNT_SLOTS = web.AppKey("count_slots", KeySlots)
# Per request: the id of its metering row, sent back as x-request-id.
REQUEST_ID = web.RequestKey("request_id", str)
