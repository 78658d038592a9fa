"""API-key authentication for the coding-tool routes: ``Authorization: Bearer`` or ``x-api-key``."""

from __future__ import annotations

from aiohttp import web

from ledger.keys import API_KEY_PREFIX, hash_api_key
from ledger.ledger import KeyRef, Ledger

from . import errors as E
from .appkeys import AUTH_THROTTLE

__all__ = ["KeyCache", "api_key_from", "authenticate", "authenticate_cached"]

_MAX_KEY_LEN = 128


def api_key_from(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = request.headers.get("x-api-key", "").strip()
    return key or None


REVOKED = "Invalid or revoked API key. Create or renew a key on the dashboard."


def _key_of(request: web.Request) -> str:
    key = api_key_from(request)
    if key is None:
        raise E.Unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
        )
    if not key.startswith(API_KEY_PREFIX) or len(key) > _MAX_KEY_LEN:
        raise E.Unauthorized("Invalid API key. Keys start with 'cpk_'; create one on the dashboard.")
    return key


async def _refused(request: web.Request, err: E.Unauthorized) -> E.GatewayError:
    """A 401 counts toward the address's throttle; past its limit the answer is a 429 instead."""
    throttled = await request.app[AUTH_THROTTLE].failed(request)
    return throttled or err


async def authenticate(request: web.Request, ledger: Ledger) -> KeyRef:
    """One Redis round trip: the key's hash resolves to its account, or to nothing once revoked."""
    request.app[AUTH_THROTTLE].check(request)
    try:
        ref = await ledger.lookup_key(_key_of(request))
        if ref is None:
            raise E.Unauthorized(REVOKED)
    except E.Unauthorized as err:
        raise await _refused(request, err) from None
    return ref


class KeyCache:
    """Key hash -> KeyRef for keys seen live, bounded, in process.

    A key's account never changes, so an entry can only go stale by revocation, and the metered path
    passes the hash to the reserve script, which refuses a revoked key atomically: revocation still
    stops a key at once, and a metered request saves the look-up round trip.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._refs: dict[str, KeyRef] = {}

    def get(self, key_hash: str) -> KeyRef | None:
        return self._refs.get(key_hash)

    def put(self, key_hash: str, ref: KeyRef) -> None:
        if len(self._refs) >= self.size:
            self._refs.pop(next(iter(self._refs)))  # oldest first
        self._refs[key_hash] = ref

    def drop(self, key_hash: str) -> None:
        self._refs.pop(key_hash, None)


async def authenticate_cached(request: web.Request, ledger: Ledger, cache: KeyCache) -> tuple[KeyRef, str]:
    """For the metered routes only: (KeyRef, key hash); the caller must reserve with the hash."""
    request.app[AUTH_THROTTLE].check(request)
    try:
        key = _key_of(request)
        key_hash = hash_api_key(key)
        ref = cache.get(key_hash)
        if ref is None:
            ref = await ledger.lookup_key(key)
            if ref is None:
                raise E.Unauthorized(REVOKED)
            cache.put(key_hash, ref)
    except E.Unauthorized as err:
        raise await _refused(request, err) from None
    return ref, key_hash
