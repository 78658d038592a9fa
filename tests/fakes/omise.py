"""A fake Omise API on loopback: charges, PromptPay sources, refunds, 3-D Secure, webhooks.

Objects have Omise's real shapes (API version 2019-05-29): ``object``, ``id`` (``chrg_test_``,
``tokn_test_``, ``src_test_``, ``rfnd_test_``, ``evnt_test_``), statuses, ``card`` details on
charges (so tests can prove the client drops them), ``refunds`` lists and error objects
``{"object": "error", "location", "code", "message"}`` with Omise's HTTP statuses.

Card numbers decide the outcome, like Omise's test cards (the numbers here are this fake's own):

    CARD_SUCCESS        charge is successful at once
    CARD_3DS            charge is pending with authorize_uri -> /3ds/{id} on this fake
    CARD_INSUFFICIENT   charge fails with insufficient_fund
    CARD_PENDING        charge stays pending (no 3DS) until a helper settles or expires it

Card numbers, names and CVVs live only in this fake's token table: the client under test only
ever sees ``tokn_test_...`` ids, as with Omise.js.

Usage::

    fake = FakeOmise()
    base = await fake.start()          # "http://127.0.0.1:<port>"
    token = fake.create_token(CARD_3DS)
    ...
    await fake.close()
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "CARD_3DS",
    "CARD_INSUFFICIENT",
    "CARD_PENDING",
    "CARD_SUCCESS",
    "FakeOmise",
    "RecordedRequest",
    "sign_webhook",
]

CARD_SUCCESS = "4242424242424242"
CARD_3DS = "4000000000003220"
CARD_INSUFFICIENT = "4000000000009995"
CARD_PENDING = "4000000000000259"

_ERROR_DOCS = "https://www.omise.co/api-errors#"


def _omise_id(prefix: str) -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return f"{prefix}_test_" + "".join(secrets.choice(alphabet) for _ in range(19))


def _now_iso(offset_s: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_webhook(secret_b64: str, timestamp: str, body: bytes) -> str:
    """Omise's webhook signature: hex HMAC-SHA256 of "<timestamp>.<body>" with the decoded secret."""
    key = base64.b64decode(secret_b64)
    return hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass
class RecordedRequest:
    method: str
    path: str
    omise_version: str | None
    idempotency_key: str | None
    content_type: str | None
    body: dict[str, Any]


@dataclass
class _Card:
    number: str
    name: str
    expiration_month: int
    expiration_year: int
    security_code: str
    used: bool = False


@dataclass
class _Controls:
    refund_errors: list[tuple[str, str]] = field(default_factory=list)
    get_failures: list[int] = field(default_factory=list)  # HTTP statuses for the next GETs
    hang: bool = False


class FakeOmise:
    """Fake Omise API; see the module docstring for the test cards and helpers."""

    def __init__(
        self, *, secret_key: str = "skey_test_fake00000000000", public_key: str = "pkey_test_fake"
    ) -> None:
        self.secret_key = secret_key
        self.public_key = public_key
        self.charges: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self.deliveries: list[int] = []  # HTTP statuses our webhook endpoint answered
        self.controls = _Controls()
        self._tokens: dict[str, _Card] = {}
        self._idempotent: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/charges", self._create_charge)
        app.router.add_get("/charges/{id}", self._get_charge)
        app.router.add_post("/charges/{id}/refunds", self._create_refund)
        app.router.add_post("/sources", self._create_source)
        app.router.add_get("/3ds/{id}", self._threeds_page)
        app.router.add_post("/3ds/{id}", self._threeds_submit)
        app.router.add_get("/qr/{id}.svg", self._qr_image)
        # Omise.js's part (Omise serves these from cdn.omise.co and vault.omise.co): a stand-in
        # script with the same API that turns card fields into a token at this fake's /tokens.
        app.router.add_get("/omise.js", self._omise_js)
        app.router.add_post("/tokens", self._create_token_http)
        app.router.add_route("OPTIONS", "/tokens", self._tokens_preflight)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._release.set()  # let hanging handlers finish so the runner can stop
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test helpers: what Omise.js, the bank and the payer would do ------------------------

    def create_token(
        self,
        number: str = CARD_SUCCESS,
        *,
        name: str = "SOMCHAI PRASERT",
        expiration_month: int = 12,
        expiration_year: int = 2031,
        security_code: str = "123",
    ) -> str:
        """What Omise.js does in the browser: card details in, a single-use token id out."""
        token = _omise_id("tokn")
        self._tokens[token] = _Card(number, name, expiration_month, expiration_year, security_code)
        return token

    def complete_3ds(self, charge_id: str, *, success: bool = True) -> None:
        """The payer finishes (or fails) 3-D Secure without a browser."""
        charge = self.charges[charge_id]
        if success:
            self._mark_successful(charge)
        else:
            self._mark_failed(charge, "failed_processing", "3-D Secure authentication failed")

    def mark_paid(self, charge_id: str) -> None:
        """The payer scanned the PromptPay QR and paid (or a pending card charge settled)."""
        self._mark_successful(self.charges[charge_id])

    def expire(self, charge_id: str) -> None:
        """A pending charge ran out of time (unscanned QR, abandoned 3-D Secure)."""
        charge = self.charges[charge_id]
        charge.update(
            status="expired",
            expired=True,
            expired_at=_now_iso(),
            failure_code="expired_charge",
            failure_message="charge expired",
        )
        self._sync_source(charge)

    def fail_next_refund(
        self, code: str = "failed_refund", message: str = "charge can't be refunded"
    ) -> None:
        self.controls.refund_errors.append((code, message))

    def fail_next_gets(self, *statuses: int) -> None:
        """The next GETs answer these HTTP statuses (e.g. 503) with no body, then work again."""
        self.controls.get_failures.extend(statuses)

    def hang(self, on: bool = True) -> None:
        """API endpoints stop answering (until close) to test client timeouts."""
        self.controls.hang = on

    def snapshot(self, charge_id: str) -> dict[str, Any]:
        """The charge as Omise would serialise it now, for building stale or reordered events."""
        return copy.deepcopy(self.charges[charge_id])

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- webhook delivery -----------------------------------------------------------------

    def build_event(self, key: str, charge_id: str, *, data: dict[str, Any] | None = None) -> bytes:
        """An Omise event body; ``data`` overrides the embedded charge (stale or forged)."""
        event_id = _omise_id("evnt")
        event = {
            "object": "event",
            "id": event_id,
            "livemode": False,
            "location": f"/events/{event_id}",
            "webhook_deliveries": [],
            "data": data if data is not None else self.snapshot(charge_id),
            "key": key,
            "created_at": _now_iso(),
        }
        return json.dumps(event).encode()

    def build_forged_event(self, charge_id: str, *, key: str = "charge.complete") -> bytes:
        """An event claiming the charge succeeded; Omise's real record may say otherwise."""
        forged = self.snapshot(charge_id)
        forged.update(
            status="successful", paid=True, authorized=True, failure_code=None, failure_message=None
        )
        return self.build_event(key, charge_id, data=forged)

    async def deliver_event(
        self,
        url: str,
        key: str,
        charge_id: str,
        *,
        times: int = 1,
        concurrent: bool = False,
        sign_with: str | None = None,
        also_sign_with: str | None = None,
        timestamp: int | None = None,
        data: dict[str, Any] | None = None,
        body: bytes | None = None,
        forged: bool = False,
    ) -> list[int]:
        """POST an event to ``url`` as Omise does, ``times`` times (same event id each time).

        ``sign_with`` is the base64 webhook secret; ``also_sign_with`` adds a second signature
        as during secret rotation; ``timestamp`` overrides the signing time (stale replays);
        ``forged`` builds a body whose embedded charge claims success. Returns the statuses.
        """
        if body is None:
            body = (
                self.build_forged_event(charge_id, key=key)
                if forged
                else self.build_event(key, charge_id, data=data)
            )
        ts = str(timestamp if timestamp is not None else int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "Omise/2019-05-29"}
        if sign_with is not None:
            signatures = [sign_webhook(sign_with, ts, body)]
            if also_sign_with is not None:
                signatures.append(sign_webhook(also_sign_with, ts, body))
            headers["Omise-Signature"] = ",".join(signatures)
            headers["Omise-Signature-Timestamp"] = ts
        async with aiohttp.ClientSession() as session:

            async def post_once() -> int:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            if concurrent:
                statuses = list(await asyncio.gather(*(post_once() for _ in range(times))))
            else:
                statuses = [await post_once() for _ in range(times)]
        self.deliveries.extend(statuses)
        return statuses

    async def deliver_events(
        self, url: str, bodies: Iterable[bytes], *, sign_with: str | None = None
    ) -> list[int]:
        """Deliver prepared event bodies in the given order (for out-of-order delivery)."""
        statuses: list[int] = []
        for body in bodies:
            statuses += await self.deliver_event(url, "", "", body=body, sign_with=sign_with)
        return statuses

    # -- HTTP handlers ----------------------------------------------------------------------

    async def _create_charge(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (refused := await self._admit(request)) is not None:
            return refused
        if (replay := self._replay(request)) is not None:
            return replay
        amount, currency = body.get("amount"), body.get("currency")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 2000:
            return self._remember(request, _error(400, "invalid_charge", "amount must be at least 2000"))
        if not isinstance(currency, str) or currency.lower() != "thb":
            return self._remember(
                request, _error(400, "invalid_charge", "currency is currently not supported")
            )
        return_uri = body.get("return_uri")
        charge_id = _omise_id("chrg")
        charge = _new_charge(charge_id, amount, currency.upper(), body.get("metadata"), return_uri)
        card_token, source = body.get("card"), body.get("source")
        if isinstance(card_token, str):
            card = self._tokens.get(card_token)
            if card is None:
                return self._remember(request, _error(404, "not_found", f"token {card_token} was not found"))
            if card.used:
                return self._remember(request, _error(400, "used_token", "token was already used"))
            card.used = True
            if card.number == CARD_3DS and not isinstance(return_uri, str):
                return self._remember(request, _error(400, "invalid_charge", "return uri is invalid"))
            charge["card"] = _card_object(card)
            self.charges[charge_id] = charge
            if card.number == CARD_3DS:
                charge["authorize_uri"] = f"{self.url}/3ds/{charge_id}"
            elif card.number == CARD_INSUFFICIENT:
                self._mark_failed(
                    charge,
                    "insufficient_fund",
                    "insufficient funds in the account or the card has reached the credit limit",
                )
            elif card.number != CARD_PENDING:
                self._mark_successful(charge)
        elif isinstance(source, str | dict):
            src = (
                self.sources.get(source)
                if isinstance(source, str)
                else self._new_source(source, amount, currency)
            )
            if src is None:
                return self._remember(request, _error(404, "not_found", f"source {source} was not found"))
            if src["amount"] != amount:
                return self._remember(
                    request, _error(400, "invalid_charge", "amount does not match source amount")
                )
            charge["source"] = src
            self.charges[charge_id] = charge
            self._sync_source(charge)
        else:
            return self._remember(request, _error(400, "invalid_charge", "card or source is required"))
        return self._remember(request, web.json_response(charge))

    async def _get_charge(self, request: web.Request) -> web.Response:
        await self._record(request)
        if (refused := await self._admit(request)) is not None:
            return refused
        if self.controls.get_failures:
            return web.Response(status=self.controls.get_failures.pop(0), text="upstream trouble")
        charge = self.charges.get(request.match_info["id"])
        if charge is None:
            return _error(404, "not_found", f"charge {request.match_info['id']} was not found")
        return web.json_response(charge)

    async def _create_refund(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (refused := await self._admit(request)) is not None:
            return refused
        if (replay := self._replay(request)) is not None:
            return replay
        charge = self.charges.get(request.match_info["id"])
        if charge is None:
            return self._remember(
                request, _error(404, "not_found", f"charge {request.match_info['id']} was not found")
            )
        if self.controls.refund_errors:
            code, message = self.controls.refund_errors.pop(0)
            return self._remember(request, _error(400, code, message))
        amount = body.get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            return self._remember(request, _error(400, "bad_request", "amount must be greater than 0"))
        if charge["status"] != "successful" or amount > charge["amount"] - charge["refunded_amount"]:
            return self._remember(request, _error(400, "failed_refund", "charge can't be refunded"))
        refund_id = _omise_id("rfnd")
        refund = {
            "object": "refund",
            "id": refund_id,
            "location": f"/charges/{charge['id']}/refunds/{refund_id}",
            "amount": amount,
            "currency": charge["currency"],
            "charge": charge["id"],
            "transaction": _omise_id("trxn"),
            "status": "closed",
            "voided": False,
            "funding_amount": amount,
            "funding_currency": charge["currency"],
            "metadata": body.get("metadata") or {},
            "created_at": _now_iso(),
        }
        charge["refunded_amount"] += amount
        charge["refunds"]["data"].append(refund)
        charge["refunds"]["total"] += 1
        charge["refundable"] = charge["refunded_amount"] < charge["amount"]
        return self._remember(request, web.json_response(refund))

    async def _create_source(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if (refused := await self._admit(request)) is not None:
            return refused
        if (replay := self._replay(request)) is not None:
            return replay
        if body.get("type") != "promptpay":
            return self._remember(request, _error(400, "invalid_source", "type is not supported"))
        amount, currency = body.get("amount"), body.get("currency")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 2000:
            return self._remember(request, _error(400, "invalid_source", "amount must be at least 2000"))
        if not isinstance(currency, str) or currency.lower() != "thb":
            return self._remember(request, _error(400, "invalid_source", "currency is not supported"))
        src = self._new_source(body, amount, currency)
        return self._remember(request, web.json_response(src))

    async def _threeds_page(self, request: web.Request) -> web.Response:
        charge_id = request.match_info["id"]
        if charge_id not in self.charges:
            return web.Response(status=404, text="unknown payment")
        page = (
            "<!doctype html><title>3-D Secure (fake)</title>"
            f'<form method="post" action="/3ds/{charge_id}"><button name="outcome" value="success">Authenticate</button>'
            '<button name="outcome" value="failure">Fail</button></form>'
        )
        return web.Response(text=page, content_type="text/html")

    async def _threeds_submit(self, request: web.Request) -> web.Response:
        charge = self.charges.get(request.match_info["id"])
        if charge is None:
            return web.Response(status=404, text="unknown payment")
        form = await request.post()
        if charge["status"] == "pending":
            self.complete_3ds(charge["id"], success=form.get("outcome") == "success")
        raise web.HTTPFound(charge["return_uri"])

    async def _omise_js(self, request: web.Request) -> web.Response:
        return web.Response(text=_OMISE_JS, content_type="text/javascript")

    async def _tokens_preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=_cors(request))

    async def _create_token_http(self, request: web.Request) -> web.Response:
        """Omise's vault: card fields in (Basic auth with the public key), a token id out."""
        expected = "Basic " + base64.b64encode(f"{self.public_key}:".encode()).decode()
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected.encode()):
            resp = _error(401, "authentication_failure", "authentication failed")
            resp.headers.update(_cors(request))
            return resp
        form = _unflatten_form(dict(await request.post()))
        card = form.get("card") if isinstance(form.get("card"), dict) else {}
        number = str(card.get("number", ""))
        if not number.isdigit() or not 12 <= len(number) <= 19:
            resp = _error(400, "invalid_card", "number is invalid")
            resp.headers.update(_cors(request))
            return resp
        month, year = str(card.get("expiration_month", "")), str(card.get("expiration_year", ""))
        token = self.create_token(
            number,
            name=str(card.get("name", "")),
            expiration_month=int(month) if month.isdigit() else 12,
            expiration_year=int(year) if year.isdigit() else 2031,
            security_code=str(card.get("security_code", "")),
        )
        body = {"object": "token", "id": token, "livemode": False, "used": False, "created_at": _now_iso()}
        return web.json_response(body, headers=_cors(request))

    async def _qr_image(self, request: web.Request) -> web.Response:
        svg = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
        return web.Response(text=svg, content_type="image/svg+xml")

    # -- internals ----------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> web.Response | None:
        """Basic auth with the secret key as user and an empty password, as Omise checks it."""
        if self.controls.hang:
            await self._release.wait()
            return web.Response(status=503)
        expected = "Basic " + base64.b64encode(f"{self.secret_key}:".encode()).decode()
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected.encode()):
            return _error(401, "authentication_failure", "authentication failed")
        return None

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = {}
        content_type = request.content_type if request.can_read_body else None
        if request.can_read_body:
            if request.content_type == "application/json":
                loaded = await request.json()
                body = loaded if isinstance(loaded, dict) else {}
            else:
                body = _unflatten_form(dict(await request.post()))
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                omise_version=request.headers.get("Omise-Version"),
                idempotency_key=request.headers.get("Idempotency-Key"),
                content_type=content_type,
                body=body,
            )
        )
        return body

    def _replay(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("Idempotency-Key")
        if key is None or (request.path, key) not in self._idempotent:
            return None
        status, payload = self._idempotent[(request.path, key)]
        return web.json_response(payload, status=status)

    def _remember(self, request: web.Request, response: web.Response) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key is not None and response.body is not None:
            assert isinstance(response.body, bytes)
            self._idempotent[(request.path, key)] = (response.status, json.loads(response.body))
        return response

    def _new_source(self, body: dict[str, Any], amount: int, currency: str) -> dict[str, Any]:
        source_id = _omise_id("src")
        src = {
            "object": "source",
            "id": source_id,
            "livemode": False,
            "location": f"/sources/{source_id}",
            "amount": amount,
            "currency": currency.upper(),
            "type": body.get("type", "promptpay"),
            "flow": "offline",
            "charge_status": "unknown",
            "scannable_code": {
                "object": "barcode",
                "type": "qr",
                "image": {
                    "object": "document",
                    "livemode": False,
                    "id": _omise_id("docu"),
                    "filename": "qrcode.svg",
                    "location": None,
                    "kind": "qr",
                    "download_uri": f"{self.url}/qr/{source_id}.svg",
                    "created_at": _now_iso(),
                },
            },
            "created_at": _now_iso(),
        }
        self.sources[source_id] = src
        return src

    def _sync_source(self, charge: dict[str, Any]) -> None:
        if isinstance(charge.get("source"), dict):
            charge["source"]["charge_status"] = charge["status"]

    def _mark_successful(self, charge: dict[str, Any]) -> None:
        charge.update(
            status="successful",
            paid=True,
            authorized=True,
            captured=True,
            paid_at=_now_iso(),
            refundable=True,
            transaction=_omise_id("trxn"),
        )
        self._sync_source(charge)

    def _mark_failed(self, charge: dict[str, Any], code: str, message: str) -> None:
        charge.update(status="failed", paid=False, failure_code=code, failure_message=message)
        self._sync_source(charge)


def _new_charge(
    charge_id: str, amount: int, currency: str, metadata: object, return_uri: object
) -> dict[str, Any]:
    return {
        "object": "charge",
        "id": charge_id,
        "livemode": False,
        "location": f"/charges/{charge_id}",
        "amount": amount,
        "net": amount - amount * 365 // 10000,
        "fee": amount * 365 // 10000,
        "fee_vat": 0,
        "refunded_amount": 0,
        "currency": currency,
        "funding_currency": currency,
        "description": None,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "status": "pending",
        "capture": True,
        "authorized": False,
        "captured": False,
        "paid": False,
        "reversed": False,
        "voided": False,
        "expired": False,
        "refundable": False,
        "disputable": False,
        "capturable": False,
        "reversible": False,
        "transaction": None,
        "failure_code": None,
        "failure_message": None,
        "card": None,
        "source": None,
        "customer": None,
        "dispute": None,
        "ip": None,
        "refunds": {
            "object": "list",
            "data": [],
            "limit": 20,
            "offset": 0,
            "total": 0,
            "location": f"/charges/{charge_id}/refunds",
            "order": "chronological",
            "from": "1970-01-01T00:00:00Z",
            "to": _now_iso(),
        },
        "authorize_uri": None,
        "return_uri": return_uri if isinstance(return_uri, str) else None,
        "created_at": _now_iso(),
        "paid_at": None,
        "expires_at": _now_iso(7 * 24 * 3600),
        "expired_at": None,
        "reversed_at": None,
    }


def _card_object(card: _Card) -> dict[str, Any]:
    """What Omise shows of a card on a charge: brand, last digits, holder name, never number or CVV."""
    card_id = _omise_id("card")
    return {
        "object": "card",
        "id": card_id,
        "livemode": False,
        "location": None,
        "country": "th",
        "city": "Bangkok",
        "postal_code": "10320",
        "financing": "credit",
        "bank": "FAKE BANK",
        "brand": "Visa",
        "fingerprint": base64.b64encode(hashlib.sha256(card.number.encode()).digest()).decode(),
        "first_digits": None,
        "last_digits": card.number[-4:],
        "name": card.name,
        "expiration_month": card.expiration_month,
        "expiration_year": card.expiration_year,
        "security_code_check": True,
        "created_at": _now_iso(),
    }


# The stand-in for Omise.js: Omise.setPublicKey(key); Omise.createToken("card", fields, cb(status, obj)).
_OMISE_JS = """(function () {
  var base = document.currentScript.src.replace(/\\/omise\\.js(\\?.*)?$/, "");
  var key = "";
  window.Omise = {
    setPublicKey: function (k) { key = k; },
    createToken: function (type, card, callback) {
      var body = new URLSearchParams();
      Object.keys(card).forEach(function (k) { body.append(type + "[" + k + "]", card[k]); });
      fetch(base + "/tokens", { method: "POST", headers: { "Authorization": "Basic " + btoa(key + ":") }, body: body })
        .then(function (r) { return r.json().then(function (j) { callback(r.status, j); }); })
        .catch(function () { callback(0, { message: "network error" }); });
    }
  };
})();
"""


def _cors(request: web.Request) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": request.headers.get("Origin", "*"),
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Allow-Methods": "POST",
    }


def _error(status: int, code: str, message: str) -> web.Response:
    payload = {
        "object": "error",
        "location": _ERROR_DOCS + code.replace("_", "-"),
        "code": code,
        "message": message,
    }
    return web.json_response(payload, status=status)


def _unflatten_form(form: dict[str, Any]) -> dict[str, Any]:
    """Omise's form encoding: ``metadata[topup_id]=x`` and ``source[type]=promptpay``."""
    out: dict[str, Any] = {}
    for key, value in form.items():
        text = str(value)
        parsed: Any = int(text) if key == "amount" and text.isdigit() else text
        if "[" in key and key.endswith("]"):
            outer, inner = key[:-1].split("[", 1)
            out.setdefault(outer, {})[inner] = parsed
        else:
            out[key] = parsed
    return out
