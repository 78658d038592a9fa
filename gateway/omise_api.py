"""Async client for Omise (Opn Payments): card and PromptPay charges, refunds, webhook checks.

We talk to Omise's REST API over the app's own aiohttp ``ClientSession`` instead of the
``omise`` package: that package uses blocking ``requests`` without timeouts and logs whole
response bodies, which carry card metadata.

What leaves this module is deliberately small: a :class:`Charge` keeps the charge id, amount,
currency, status, the URIs the user must visit, failure reason, our metadata and timestamps.
Card brand, digits, holder name and fingerprint are dropped when the charge is parsed, so they
can never reach a log line, a database row or a ``repr``.

Wire facts this module relies on (Omise API version ``2019-05-29``):

* ``POST /charges`` with ``card=tokn_...`` (a single-use Omise.js token) or ``source=src_...``;
  3-D Secure charges need ``return_uri`` and come back ``pending`` with ``authorize_uri``.
* ``POST /sources`` with ``type=promptpay``; the QR image is
  ``source.scannable_code.image.download_uri``, also embedded in the charge's ``source``.
* ``POST /charges/{id}/refunds``; errors are ``{"object": "error", "code", "message"}``.
* Webhooks: ``Omise-Signature`` is the hex HMAC-SHA256 of ``"<timestamp>.<raw body>"`` keyed
  with the base64-decoded webhook secret, ``Omise-Signature-Timestamp`` the Unix seconds;
  during secret rotation the signature header holds several comma-separated signatures.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import aiohttp

from gateway.errors import BadRequest

__all__ = [
    "CHARGE_STATUSES",
    "OMISE_API_BASE",
    "OMISE_API_VERSION",
    "Charge",
    "EventRef",
    "OmiseClient",
    "OmiseError",
    "OmiseUnavailable",
    "Refund",
    "parse_event",
    "verify_webhook_signature",
]

log = logging.getLogger(__name__)

OMISE_API_BASE: Final = "https://api.omise.co"
# Pinned so Omise's object shapes cannot change under us when the account default moves.
OMISE_API_VERSION: Final = "2019-05-29"
CHARGE_STATUSES: Final = frozenset({"pending", "successful", "failed", "expired", "reversed"})

# Omise ids are lower-case base36 after the prefix. SECURITY: ids reach URL paths, and a
# charge id may come from an unauthenticated webhook body, so nothing else is accepted.
_CHARGE_ID = re.compile(r"chrg_(?:test_)?[0-9a-z]{1,64}")
_TOKEN_ID = re.compile(r"tokn_(?:test_)?[0-9a-z]{1,64}")
_SOURCE_ID = re.compile(r"src_(?:test_)?[0-9a-z]{1,64}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")

_MAX_RESPONSE_BYTES: Final = 1 << 20  # a charge with 100 refunds is ~100 KiB
_MAX_EVENT_BYTES: Final = 1 << 20
_MAX_SIGNATURES: Final = 8  # rotation sends two; anything past a handful is abuse
_MAX_METADATA_KEYS: Final = 16
_MAX_IDEMPOTENCY_KEY_CHARS: Final = 255


class OmiseError(Exception):
    """Omise refused the request; ``code`` and ``message`` come from Omise's error object.

    Omise's messages name fields and reasons (``"amount must be at least 2000"``), never card
    data, so ``message`` is safe to show the user.
    """

    def __init__(self, code: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


class OmiseUnavailable(OmiseError):
    """No usable answer from Omise (timeout, connection error, 5xx, malformed body).

    For a POST the outcome is unknown: retry with the same idempotency key, or look the charge
    up by our ``topup_id`` before assuming nothing happened.
    """


@dataclass(frozen=True)
class Charge:
    """The parts of an Omise charge we keep; card details never get this far."""

    id: str
    amount: int  # smallest currency unit (satang for THB)
    currency: str  # lower-case ISO 4217, as our ledger compares it
    status: str  # one of CHARGE_STATUSES
    paid: bool
    authorize_uri: str | None  # 3-D Secure page to send the user to while pending
    failure_code: str | None
    failure_message: str | None
    metadata: dict[str, str]
    qr_uri: str | None  # PromptPay QR image
    refunded_amount: int
    created_at: str
    expires_at: str | None = None

    @classmethod
    def from_omise(cls, obj: Mapping[str, Any]) -> Charge:
        """Parse Omise's charge object, keeping only our fields (raises OmiseUnavailable)."""
        if obj.get("object") != "charge":
            raise _malformed("charge object")
        charge_id = obj.get("id")
        if not isinstance(charge_id, str) or not _CHARGE_ID.fullmatch(charge_id):
            raise _malformed("charge id")
        status = obj.get("status")
        if status not in CHARGE_STATUSES:
            raise _malformed("charge status")
        # Older API versions call it "refunded"; prefer the 2019-05-29 name.
        refunded = obj.get("refunded_amount", obj.get("refunded", 0))
        created_at = obj.get("created_at", obj.get("created"))
        return cls(
            id=charge_id,
            amount=_int_field(obj, "amount"),
            currency=_currency_field(obj),
            status=str(status),
            paid=obj.get("paid") is True,
            authorize_uri=_opt_str(obj.get("authorize_uri")),
            failure_code=_opt_str(obj.get("failure_code")),
            failure_message=_opt_str(obj.get("failure_message")),
            metadata=_str_metadata(obj.get("metadata")),
            qr_uri=_qr_uri(obj.get("source")),
            refunded_amount=refunded if _is_int(refunded) else 0,
            created_at=created_at if isinstance(created_at, str) else "",
            expires_at=_opt_str(obj.get("expires_at")),
        )


@dataclass(frozen=True)
class Refund:
    """An Omise refund: what went back to the payer, in the charge's smallest unit."""

    id: str
    charge_id: str
    amount: int
    currency: str
    status: str | None  # "closed" once settled on newer API versions; absent on older ones
    voided: bool
    created_at: str

    @classmethod
    def from_omise(cls, obj: Mapping[str, Any]) -> Refund:
        if obj.get("object") != "refund" or not isinstance(obj.get("id"), str):
            raise _malformed("refund object")
        created_at = obj.get("created_at", obj.get("created"))
        return cls(
            id=str(obj["id"]),
            charge_id=str(obj.get("charge") or ""),
            amount=_int_field(obj, "amount"),
            currency=_currency_field(obj),
            status=_opt_str(obj.get("status")),
            voided=obj.get("voided") is True,
            created_at=created_at if isinstance(created_at, str) else "",
        )


class EventRef(NamedTuple):
    """Only the ids out of a webhook body; everything else is fetched from Omise."""

    key: str  # e.g. "charge.complete"
    charge_id: str | None


class OmiseClient:
    """Omise REST calls with timeouts; GETs retry with capped backoff, POSTs never do."""

    def __init__(
        self,
        secret_key: str,
        session: aiohttp.ClientSession,
        *,
        api_base: str = OMISE_API_BASE,
        timeout_s: float = 15.0,
        get_attempts: int = 3,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 2.0,
    ) -> None:
        if not secret_key:
            raise ValueError("OMISE_SECRET_KEY is empty")
        if get_attempts < 1:
            raise ValueError("get_attempts must be at least 1")
        if ":" in secret_key:
            raise ValueError("OMISE_SECRET_KEY must not contain ':'")
        # Omise: HTTP Basic with the secret key as user name and an empty password.
        self._authorization = aiohttp.encode_basic_auth(secret_key, "")
        self._session = session
        self._api_base = api_base.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._get_attempts = get_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s

    def __repr__(self) -> str:
        # SECURITY: never show the secret key, not even in a traceback's locals.
        return f"OmiseClient(api_base={self._api_base!r})"

    async def create_card_charge(
        self,
        amount: int,
        currency: str,
        token: str,
        return_uri: str,
        metadata: Mapping[str, str],
        idempotency_key: str | None = None,
    ) -> Charge:
        """Charge an Omise.js card token; a 3-D Secure card comes back pending with authorize_uri."""
        _check_amount(amount, currency)
        if not _TOKEN_ID.fullmatch(token):
            raise BadRequest("token is not an Omise card token", param="token")
        body = {
            "amount": amount,
            "currency": currency.lower(),
            "card": token,
            "return_uri": _check_return_uri(return_uri),
            "metadata": _check_metadata(metadata),
        }
        obj = await self._post("/charges", body, idempotency_key)
        return Charge.from_omise(obj)

    async def create_promptpay_charge(
        self,
        amount: int,
        currency: str,
        return_uri: str,
        metadata: Mapping[str, str],
        idempotency_key: str | None = None,
    ) -> Charge:
        """Create a PromptPay source, then a charge on it; the QR is in ``Charge.qr_uri``.

        Two calls as Omise's PromptPay guide describes. An orphan source (if the charge call
        fails) is harmless: it cannot be paid without a charge and simply expires.
        """
        _check_amount(amount, currency)
        checked_metadata = _check_metadata(metadata)
        checked_return_uri = _check_return_uri(return_uri)
        source = await self._post(
            "/sources",
            {"type": "promptpay", "amount": amount, "currency": currency.lower()},
            # Same key with a suffix: a retried top-up reuses its source too.
            f"{idempotency_key}:source" if idempotency_key else None,
        )
        source_id = source.get("id")
        if source.get("object") != "source" or not isinstance(source_id, str):
            raise _malformed("source object")
        if not _SOURCE_ID.fullmatch(source_id):
            raise _malformed("source id")
        body = {
            "amount": amount,
            "currency": currency.lower(),
            "source": source_id,
            "return_uri": checked_return_uri,
            "metadata": checked_metadata,
        }
        obj = await self._post("/charges", body, idempotency_key)
        return Charge.from_omise(obj)

    async def retrieve_charge(self, charge_id: str) -> Charge:
        """The charge as Omise has it now: the only status we ever credit on."""
        _check_charge_id(charge_id)
        obj = await self._get(f"/charges/{charge_id}")
        return Charge.from_omise(obj)

    async def create_refund(
        self,
        charge_id: str,
        amount: int,
        metadata: Mapping[str, str],
        idempotency_key: str | None = None,
    ) -> Refund:
        """Refund part or all of a successful charge (raises OmiseError ``failed_refund``)."""
        _check_charge_id(charge_id)
        if not _is_int(amount) or amount <= 0:
            raise BadRequest("amount must be a positive integer", param="amount")
        body = {"amount": amount, "metadata": _check_metadata(metadata)}
        obj = await self._post(f"/charges/{charge_id}/refunds", body, idempotency_key)
        return Refund.from_omise(obj)

    # -- transport -------------------------------------------------------------------------

    async def _post(self, path: str, body: Mapping[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        headers = {}
        if idempotency_key is not None:
            if not 0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY_CHARS:
                raise BadRequest("idempotency key must be 1-255 characters", param="idempotency_key")
            headers["Idempotency-Key"] = idempotency_key
        # Not retried: a timed-out POST may have created the charge. The caller decides,
        # reusing its idempotency key.
        return await self._request("POST", path, body, headers)

    async def _get(self, path: str) -> dict[str, Any]:
        for attempt in range(1, self._get_attempts + 1):
            try:
                return await self._request("GET", path, None, {})
            except OmiseUnavailable:
                if attempt == self._get_attempts:
                    raise
                # Full jitter, capped (stripe-python's policy): spreads retries from many workers.
                delay = min(self._backoff_cap_s, self._backoff_base_s * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, delay))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None, extra_headers: Mapping[str, str]
    ) -> dict[str, Any]:
        headers = {
            "Accept": "application/json",
            "Authorization": self._authorization,
            "Omise-Version": OMISE_API_VERSION,
            **extra_headers,
        }
        started = time.monotonic()
        try:
            async with self._session.request(
                method,
                self._api_base + path,
                json=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await _read_capped(resp)
        except TimeoutError as exc:
            log.warning("omise %s %s timed out after %.1fs", method, path, time.monotonic() - started)
            raise OmiseUnavailable("timeout", "Omise did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            # The exception class only: its text may echo the URL, never a body, but keep it short.
            log.warning("omise %s %s failed: %s", method, path, type(exc).__name__)
            raise OmiseUnavailable("unavailable", "Omise could not be reached") from exc
        # SECURITY: log method, path (ids only), status and timing; never the body.
        log.info("omise %s %s -> %d in %.0fms", method, path, status, (time.monotonic() - started) * 1000)
        obj = _decode_object(raw)
        if obj is not None and obj.get("object") == "error":
            code = _opt_str(obj.get("code")) or "unknown_error"
            message = _opt_str(obj.get("message")) or "Omise refused the request"
            if status >= 500:
                raise OmiseUnavailable(code, message, http_status=status)
            raise OmiseError(code, message, http_status=status)
        if status >= 500 or status == 429:
            raise OmiseUnavailable("unavailable", f"Omise answered HTTP {status}", http_status=status)
        if obj is None or not 200 <= status < 300:
            raise OmiseUnavailable(
                "bad_response", f"unexpected Omise answer (HTTP {status})", http_status=status
            )
        return obj


# -- webhooks --------------------------------------------------------------------------------


def verify_webhook_signature(
    secret_b64: str,
    body: bytes,
    signature_header: str,
    timestamp_header: str,
    *,
    now: float,
    tolerance_s: int = 300,
) -> bool:
    """True if any signature in ``Omise-Signature`` matches and the timestamp is fresh.

    A True answer only says the bytes came from Omise; the route must still fetch the charge
    before crediting, since a genuine but old or reordered event can name a stale status.
    """
    if not secret_b64 or not signature_header or not timestamp_header:
        return False
    try:
        secret = base64.b64decode(secret_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    if not secret:
        return False
    ts_text = timestamp_header.strip()
    if not ts_text.isdigit() or len(ts_text) > 12:
        return False
    # SECURITY: bound replay: a captured request is useless after tolerance_s, either way in time.
    if abs(now - int(ts_text)) > tolerance_s:
        return False
    # SECURITY: sign the raw bytes as received; re-serialised JSON would not match.
    signed = ts_text.encode("ascii") + b"." + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest().encode("ascii")
    candidates = signature_header.split(",")
    if len(candidates) > _MAX_SIGNATURES:
        return False
    matched = False
    for candidate in candidates:
        # SECURITY: constant-time comparison; check every candidate so timing does not reveal
        # which one (old or new secret during rotation) matched.
        if hmac.compare_digest(expected, candidate.strip().lower().encode("utf-8", "replace")):
            matched = True
    return matched


def parse_event(body: bytes) -> EventRef:
    """The event key and charge id of an Omise webhook body; nothing else is trusted from it.

    Raises BadRequest if the body is not an Omise event. ``charge_id`` is None for events
    that do not concern a charge (transfers, disputes...), and comes from a refund's
    ``charge`` field for ``refund.*`` events.
    """
    if len(body) > _MAX_EVENT_BYTES:
        raise BadRequest("webhook body is too large")
    obj = _decode_object(body)
    if obj is None or obj.get("object") != "event":
        raise BadRequest("webhook body is not an Omise event")
    key = obj.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= 64:
        raise BadRequest("webhook event has no key", param="key")
    data = obj.get("data")
    candidate: object = None
    if isinstance(data, dict):
        if data.get("object") == "charge":
            candidate = data.get("id")
        elif data.get("object") == "refund":
            candidate = data.get("charge")
    charge_id = candidate if isinstance(candidate, str) and _CHARGE_ID.fullmatch(candidate) else None
    return EventRef(key, charge_id)


# -- helpers ---------------------------------------------------------------------------------


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > _MAX_RESPONSE_BYTES:
            raise OmiseUnavailable("bad_response", "Omise answer too large", http_status=resp.status)
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_object(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past any event
        return None
    return obj if isinstance(obj, dict) else None


def _malformed(what: str) -> OmiseUnavailable:
    return OmiseUnavailable("bad_response", f"Omise answered with an unexpected {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(name)
    return value


def _currency_field(obj: Mapping[str, Any]) -> str:
    value = obj.get("currency")
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise _malformed("currency")
    return value.lower()  # Omise answers "thb" or "THB" depending on API version


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _str_metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _qr_uri(source: object) -> str | None:
    if not isinstance(source, dict):
        return None
    code = source.get("scannable_code")
    image = code.get("image") if isinstance(code, dict) else None
    return _opt_str(image.get("download_uri")) if isinstance(image, dict) else None


def _check_amount(amount: int, currency: str) -> None:
    if not _is_int(amount) or amount <= 0:
        raise BadRequest("amount must be a positive integer in the smallest currency unit", param="amount")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise BadRequest("currency must be a three-letter code", param="currency")


def _check_charge_id(charge_id: str) -> None:
    if not isinstance(charge_id, str) or not _CHARGE_ID.fullmatch(charge_id):
        raise BadRequest("charge id is not an Omise charge id", param="charge_id")


def _check_return_uri(return_uri: str) -> str:
    if not isinstance(return_uri, str) or not return_uri.startswith(("https://", "http://")):
        raise BadRequest("return_uri must be an absolute http(s) URL", param="return_uri")
    return return_uri


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > _MAX_METADATA_KEYS:
        raise BadRequest("too many metadata keys", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("metadata keys and values must be strings", param="metadata")
    return dict(metadata)
