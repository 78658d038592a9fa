"""Limits on what costs us without charging anyone: wrong API keys and token counting.

* ``AuthThrottle``: failed authentications (401) are counted per client address in Redis, in the
  ledger's hash-tagged shard style (``cp:{s07}:authfail:<hash of the address>``, single-slot commands
  only), so every web process sees the same count. Past the limit within the window the address gets
  429 with ``Retry-After``, for a right key too, so guessing stops. The block is remembered in
  process (learned from the count a failure returns), so a successful request costs no Redis call.
* ``KeySlots``: ``count_tokens`` is free, so each key may run only a few at a time (in process).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from ledger.keys import Keyspace

from . import errors as E
from .metrics import Metrics

__all__ = ["AuthThrottle", "KeySlots", "check_metrics_access", "client_address", "is_local_client"]


def client_address(request: web.Request, forwarded_hops: int = 0) -> str:
    """The peer's address; behind ``forwarded_hops`` trusted proxies, the address the outermost of
    them saw (X-Forwarded-For counted from the right: what a client writes on the left is not trusted)."""
    if forwarded_hops > 0:
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= forwarded_hops:
            return hops[-forwarded_hops]
    return request.remote or "unknown"


def is_local_client(request: web.Request) -> bool:
    """A client on this machine, talking to us directly (a proxy in front would forward others)."""
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        return False
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def check_metrics_access(request: web.Request, token: str | None) -> None:
    """``/metrics`` shows revenue per model: with METRICS_TOKEN set, only ``Authorization: Bearer
    <token>`` reads it; without, only a scraper on this machine talking to us directly."""
    if token:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise E.Unauthorized("Metrics need 'Authorization: Bearer <METRICS_TOKEN>'.")
    elif not is_local_client(request):
        raise E.Forbidden("Metrics are served to this machine only; set METRICS_TOKEN to scrape them remotely.")


class AuthThrottle:
    def __init__(
        self,
        redis: Any,
        keyspace: Keyspace,
        metrics: Metrics,
        *,
        limit: int,
        window_s: int,
        forwarded_hops: int = 0,
    ) -> None:
        self.redis = redis
        self.keys = keyspace
        self.metrics = metrics
        self.limit = limit
        self.window_ms = window_s * 1000
        self.forwarded_hops = forwarded_hops
        self._blocked: dict[str, float] = {}  # address -> monotonic time the block ends

    def _key(self, address: str) -> str:
        digest = hashlib.sha256(b"authfail:" + address.encode()).hexdigest()[:32]
        return self.keys.shard_prefix(int(digest[:8], 16) % self.keys.shards) + "authfail:" + digest

    def _refuse(self, until: float) -> E.TooManyRequests:
        self.metrics.auth_failure("throttled")
        wait = max(1, int(until - time.monotonic() + 0.999))
        return E.TooManyRequests(
            f"Too many failed API key attempts from your address; retry in {wait} s.",
            headers={"Retry-After": str(wait)},
        )

    def check(self, request: web.Request) -> None:
        """Before the key is looked at: refuse an address that is blocked (no Redis call)."""
        if not self._blocked:
            return
        address = client_address(request, self.forwarded_hops)
        until = self._blocked.get(address)
        if until is None:
            return
        if until > time.monotonic():
            raise self._refuse(until)
        del self._blocked[address]

    async def failed(self, request: web.Request) -> E.TooManyRequests | None:
        """Count a 401; returns the 429 to answer instead once the address is past the limit."""
        address = client_address(request, self.forwarded_hops)
        key = self._key(address)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.pexpire(key, self.window_ms, nx=True)
        pipe.pttl(key)
        count, _, ttl_ms = await pipe.execute()
        self.metrics.auth_failure("rejected")
        if int(count) <= self.limit:
            return None
        until = time.monotonic() + max(int(ttl_ms), 1000) / 1000
        if len(self._blocked) > 10_000:
            now = time.monotonic()
            self._blocked = {a: t for a, t in self._blocked.items() if t > now}
        self._blocked[address] = until
        return self._refuse(until)


class KeySlots:
    """At most ``limit`` requests of one key at a time, in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, key_id: str) -> Iterator[None]:
        n = self._busy.get(key_id, 0)
        if n >= self.limit:
            raise E.TooManyRequests(
                f"At most {self.limit} token counts at a time per API key; retry when one finishes."
            )
        self._busy[key_id] = n + 1
        try:
            yield
        finally:
            left = self._busy[key_id] - 1
            if left:
                self._busy[key_id] = left
            else:
                del self._busy[key_id]
