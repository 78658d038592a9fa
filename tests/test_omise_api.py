"""gateway.omise_api against the fake Omise on loopback: real HTTP, real bytes."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import omise_api
from gateway.errors import BadRequest
from gateway.omise_api import (
    Charge,
    EventRef,
    OmiseClient,
    OmiseError,
    OmiseUnavailable,
    parse_event,
    verify_webhook_signature,
)
from tests.fakes.omise import (
    CARD_3DS,
    CARD_INSUFFICIENT,
    CARD_PENDING,
    CARD_SUCCESS,
    FakeOmise,
    sign_webhook,
)

RETURN_URI = "https://gateway.example/topups/tp_1/return"
SECRET = base64.b64encode(b"webhook-secret-current-0123456789").decode()
OLD_SECRET = base64.b64encode(b"webhook-secret-previous-987654321").decode()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOmise]:
    server = FakeOmise()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(fake: FakeOmise, session: aiohttp.ClientSession) -> OmiseClient:
    return OmiseClient(fake.secret_key, session, api_base=fake.url, timeout_s=5, backoff_base_s=0.01)


async def _card_charge(client: OmiseClient, fake: FakeOmise, number: str, **kw: Any) -> Charge:
    token = fake.create_token(number)
    return await client.create_card_charge(50000, "THB", token, RETURN_URI, {"topup_id": "tp_1"}, **kw)


# -- charges -------------------------------------------------------------------------------


async def test_card_charge_succeeds_with_amount_in_satang_and_our_metadata(
    client: OmiseClient, fake: FakeOmise
) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS, idempotency_key="topup:tp_1")

    assert charge.status == "successful" and charge.paid
    assert (charge.amount, charge.currency) == (50000, "thb")
    assert charge.metadata == {"topup_id": "tp_1"}
    assert charge.authorize_uri is None and charge.failure_code is None
    assert charge.id.startswith("chrg_test_") and charge.created_at
    sent = fake.requests_to("POST", "/charges")[0]
    assert sent.omise_version == omise_api.OMISE_API_VERSION
    assert sent.idempotency_key == "topup:tp_1"
    assert sent.content_type == "application/json"
    # Only the token crosses our server, never card data.
    assert set(sent.body) == {"amount", "currency", "card", "return_uri", "metadata"}
    assert sent.body["card"].startswith("tokn_test_") and sent.body["amount"] == 50000


async def test_charge_keeps_no_card_details(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS)

    raw_card = fake.charges[charge.id]["card"]
    assert raw_card["last_digits"] == "4242" and raw_card["name"] == "SOMCHAI PRASERT"
    kept = {f.name for f in dataclasses.fields(Charge)}
    assert kept.isdisjoint({"card", "source", "customer", "ip"})
    text = repr(charge) + str(dataclasses.asdict(charge))
    for secret in ("4242", "SOMCHAI", "Visa", raw_card["fingerprint"], "2031", "card_test_"):
        assert secret not in text


async def test_3ds_charge_is_pending_then_successful_after_authorize(
    client: OmiseClient, fake: FakeOmise, session: aiohttp.ClientSession
) -> None:
    charge = await _card_charge(client, fake, CARD_3DS)
    assert charge.status == "pending" and not charge.paid
    assert charge.authorize_uri is not None

    async with session.get(charge.authorize_uri) as page:
        assert page.status == 200 and "Authenticate" in await page.text()
    async with session.post(charge.authorize_uri, data={"outcome": "success"}, allow_redirects=False) as done:
        assert done.status == 302 and done.headers["Location"] == RETURN_URI

    after = await client.retrieve_charge(charge.id)
    assert after.status == "successful" and after.paid and after.id == charge.id


async def test_3ds_failure_surfaces_omise_reason(
    client: OmiseClient, fake: FakeOmise, session: aiohttp.ClientSession
) -> None:
    charge = await _card_charge(client, fake, CARD_3DS)
    assert charge.authorize_uri is not None
    async with session.post(charge.authorize_uri, data={"outcome": "failure"}, allow_redirects=False) as done:
        assert done.status == 302

    after = await client.retrieve_charge(charge.id)
    assert after.status == "failed" and not after.paid
    assert after.failure_code == "failed_processing" and after.failure_message


async def test_declined_card_carries_failure_code_and_message(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_INSUFFICIENT)

    assert charge.status == "failed" and not charge.paid
    assert charge.failure_code == "insufficient_fund"
    assert charge.failure_message is not None and "insufficient funds" in charge.failure_message


async def test_pending_charge_can_expire(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_PENDING)
    assert charge.status == "pending" and charge.expires_at

    fake.expire(charge.id)
    after = await client.retrieve_charge(charge.id)
    assert after.status == "expired" and not after.paid and after.failure_code


async def test_promptpay_charge_has_qr_and_completes_when_paid(
    client: OmiseClient, fake: FakeOmise, session: aiohttp.ClientSession
) -> None:
    charge = await client.create_promptpay_charge(
        30000, "thb", RETURN_URI, {"topup_id": "tp_2"}, "topup:tp_2"
    )

    assert charge.status == "pending" and not charge.paid
    assert charge.qr_uri is not None and charge.authorize_uri is None
    async with session.get(charge.qr_uri) as qr:
        assert qr.status == 200 and qr.content_type == "image/svg+xml"
    source_req = fake.requests_to("POST", "/sources")[0]
    charge_req = fake.requests_to("POST", "/charges")[0]
    assert source_req.body == {"type": "promptpay", "amount": 30000, "currency": "thb"}
    assert charge_req.body["source"].startswith("src_test_") and charge_req.body["metadata"] == {
        "topup_id": "tp_2"
    }
    assert charge_req.idempotency_key == "topup:tp_2"

    fake.mark_paid(charge.id)
    after = await client.retrieve_charge(charge.id)
    assert after.status == "successful" and after.paid and after.qr_uri == charge.qr_uri


async def test_same_idempotency_key_returns_the_same_charge(client: OmiseClient, fake: FakeOmise) -> None:
    token = fake.create_token(CARD_SUCCESS)
    first = await client.create_card_charge(
        50000, "thb", token, RETURN_URI, {"topup_id": "tp_3"}, "topup:tp_3"
    )
    again = await client.create_card_charge(
        50000, "thb", token, RETURN_URI, {"topup_id": "tp_3"}, "topup:tp_3"
    )

    assert again.id == first.id
    assert len(fake.charges) == 1


async def test_reused_token_is_refused_with_omise_code(client: OmiseClient, fake: FakeOmise) -> None:
    token = fake.create_token(CARD_SUCCESS)
    await client.create_card_charge(50000, "thb", token, RETURN_URI, {})

    with pytest.raises(OmiseError) as err:
        await client.create_card_charge(50000, "thb", token, RETURN_URI, {})
    assert (err.value.code, err.value.http_status) == ("used_token", 400)
    assert not isinstance(err.value, OmiseUnavailable)


async def test_omise_validation_error_message_is_passed_through(client: OmiseClient, fake: FakeOmise) -> None:
    token = fake.create_token(CARD_SUCCESS)
    with pytest.raises(OmiseError) as err:
        await client.create_card_charge(100, "thb", token, RETURN_URI, {})
    assert err.value.code == "invalid_charge" and err.value.message == "amount must be at least 2000"


async def test_wrong_secret_key_is_authentication_failure(
    fake: FakeOmise, session: aiohttp.ClientSession
) -> None:
    bad = OmiseClient("skey_test_wrong", session, api_base=fake.url)
    with pytest.raises(OmiseError) as err:
        await bad.retrieve_charge("chrg_test_abc")
    assert (err.value.code, err.value.http_status) == ("authentication_failure", 401)


async def test_unknown_charge_is_not_found(client: OmiseClient) -> None:
    with pytest.raises(OmiseError) as err:
        await client.retrieve_charge("chrg_test_doesnotexist")
    assert (err.value.code, err.value.http_status) == ("not_found", 404)


@pytest.mark.parametrize(
    "bad_id", ["../accounts", "chrg_test_x/refunds", "CHRG_TEST_A", "chrg_test_a?x=1", ""]
)
async def test_malformed_charge_id_never_reaches_omise(
    client: OmiseClient, fake: FakeOmise, bad_id: str
) -> None:
    with pytest.raises(BadRequest) as err:
        await client.retrieve_charge(bad_id)
    assert err.value.param == "charge_id"
    assert fake.requests == []


async def test_bad_inputs_are_rejected_before_any_request(client: OmiseClient, fake: FakeOmise) -> None:
    token = fake.create_token(CARD_SUCCESS)
    cases: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: client.create_card_charge(0, "thb", token, RETURN_URI, {}), "amount"),
        (lambda: client.create_card_charge(True, "thb", token, RETURN_URI, {}), "amount"),
        (lambda: client.create_card_charge(5000, "baht", token, RETURN_URI, {}), "currency"),
        (lambda: client.create_card_charge(5000, "thb", "4242424242424242", RETURN_URI, {}), "token"),
        (lambda: client.create_card_charge(5000, "thb", token, "javascript:x", {}), "return_uri"),
        (lambda: client.create_promptpay_charge(5000, "thb", RETURN_URI, {"n": 1}), "metadata"),  # type: ignore[dict-item]
    ]
    for call, param in cases:
        with pytest.raises(BadRequest) as err:
            await call()
        assert err.value.param == param
    assert fake.requests == []


# -- refunds -------------------------------------------------------------------------------


async def test_partial_refund_is_recorded_on_the_charge(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS)

    refund = await client.create_refund(charge.id, 20000, {"bucket_id": "b_1"}, "refund:b_1")

    assert refund.id.startswith("rfnd_test_") and refund.charge_id == charge.id
    assert (refund.amount, refund.currency, refund.status, refund.voided) == (20000, "thb", "closed", False)
    assert fake.requests_to("POST", f"/charges/{charge.id}/refunds")[0].body == {
        "amount": 20000,
        "metadata": {"bucket_id": "b_1"},
    }
    after = await client.retrieve_charge(charge.id)
    assert after.refunded_amount == 20000 and after.status == "successful"


async def test_refund_error_raises_omise_error_with_code(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS)
    fake.fail_next_refund("failed_refund", "charge can't be refunded")

    with pytest.raises(OmiseError) as err:
        await client.create_refund(charge.id, 10000, {})
    assert (err.value.code, err.value.message, err.value.http_status) == (
        "failed_refund",
        "charge can't be refunded",
        400,
    )
    assert (await client.retrieve_charge(charge.id)).refunded_amount == 0
    # The control is one-shot: the next refund goes through.
    assert (await client.create_refund(charge.id, 10000, {})).amount == 10000


async def test_refund_beyond_what_is_left_is_refused(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS)
    await client.create_refund(charge.id, 40000, {})

    with pytest.raises(OmiseError) as err:
        await client.create_refund(charge.id, 10001, {})
    assert err.value.code == "failed_refund"


async def test_failed_charge_cannot_be_refunded(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_INSUFFICIENT)
    with pytest.raises(OmiseError) as err:
        await client.create_refund(charge.id, 1000, {})
    assert err.value.code == "failed_refund"


# -- transport: timeouts and retries -----------------------------------------------------------


async def test_timeout_raises_promptly_against_a_hanging_endpoint(
    fake: FakeOmise, session: aiohttp.ClientSession
) -> None:
    quick = OmiseClient(
        fake.secret_key, session, api_base=fake.url, timeout_s=0.3, get_attempts=2, backoff_base_s=0.01
    )
    token = fake.create_token(CARD_SUCCESS)
    fake.hang()

    started = time.monotonic()
    with pytest.raises(OmiseUnavailable) as err:
        await quick.create_card_charge(50000, "thb", token, RETURN_URI, {})
    assert err.value.code == "timeout"
    assert time.monotonic() - started < 2
    # A POST whose outcome is unknown is never retried by the client.
    assert len(fake.requests_to("POST", "/charges")) == 1

    started = time.monotonic()
    with pytest.raises(OmiseUnavailable):
        await quick.retrieve_charge("chrg_test_abc")
    assert time.monotonic() - started < 3
    assert len(fake.requests_to("GET", "/charges/chrg_test_abc")) == 2


async def test_get_is_retried_after_server_errors(client: OmiseClient, fake: FakeOmise) -> None:
    charge = await _card_charge(client, fake, CARD_SUCCESS)
    fake.fail_next_gets(503, 502)

    again = await client.retrieve_charge(charge.id)

    assert again.id == charge.id
    assert len(fake.requests_to("GET", f"/charges/{charge.id}")) == 3


async def test_get_gives_up_after_its_attempts(client: OmiseClient, fake: FakeOmise) -> None:
    fake.fail_next_gets(503, 503, 503, 503)
    with pytest.raises(OmiseUnavailable) as err:
        await client.retrieve_charge("chrg_test_abc")
    assert err.value.http_status == 503
    assert len(fake.requests_to("GET", "/charges/chrg_test_abc")) == 3


async def test_unreachable_omise_is_unavailable(session: aiohttp.ClientSession) -> None:
    gone = FakeOmise()
    base = await gone.start()
    await gone.close()
    dead = OmiseClient("skey_test_x", session, api_base=base, timeout_s=1, get_attempts=1)
    with pytest.raises(OmiseUnavailable) as err:
        await dead.retrieve_charge("chrg_test_abc")
    assert err.value.code == "unavailable"


async def test_client_repr_hides_the_secret_key(session: aiohttp.ClientSession) -> None:
    assert "supersecret" not in repr(OmiseClient("skey_live_supersecret", session))


# -- webhook signatures ------------------------------------------------------------------------


def _signed(body: bytes, *, ts: int, secrets: tuple[str, ...] = (SECRET,)) -> tuple[str, str]:
    return ",".join(sign_webhook(s, str(ts), body) for s in secrets), str(ts)


def test_good_signature_is_accepted() -> None:
    body = b'{"object":"event","key":"charge.complete"}'
    sig, ts = _signed(body, ts=1_700_000_000)
    assert verify_webhook_signature(SECRET, body, sig, ts, now=1_700_000_010)


def test_bad_or_tampered_signature_is_rejected() -> None:
    body = b'{"object":"event","key":"charge.complete"}'
    sig, ts = _signed(body, ts=1_700_000_000)
    now = 1_700_000_000.0
    assert not verify_webhook_signature(SECRET, body + b" ", sig, ts, now=now)
    assert not verify_webhook_signature(OLD_SECRET, body, sig, ts, now=now)
    assert not verify_webhook_signature(SECRET, body, "0" * 64, ts, now=now)
    assert not verify_webhook_signature(SECRET, body, sig, "1700000001", now=now)  # timestamp is signed too
    assert not verify_webhook_signature(SECRET, body, "", ts, now=now)
    assert not verify_webhook_signature(SECRET, body, sig, "", now=now)
    assert not verify_webhook_signature("", body, sig, ts, now=now)
    assert not verify_webhook_signature("not base64!", body, sig, ts, now=now)
    assert verify_webhook_signature(f" {SECRET}\n", body, sig, ts, now=now)  # pasted with whitespace
    assert not verify_webhook_signature(SECRET, body, sig, "17e8", now=now)
    assert not verify_webhook_signature(SECRET, body, "é" * 64, ts, now=now)


def test_stale_or_future_timestamp_is_rejected() -> None:
    body = b"{}"
    sig, ts = _signed(body, ts=1_700_000_000)
    assert verify_webhook_signature(SECRET, body, sig, ts, now=1_700_000_300)
    assert not verify_webhook_signature(SECRET, body, sig, ts, now=1_700_000_301)
    assert not verify_webhook_signature(SECRET, body, sig, ts, now=1_699_999_000)
    assert verify_webhook_signature(SECRET, body, sig, ts, now=1_700_000_500, tolerance_s=600)


def test_rotated_header_with_several_signatures_is_accepted() -> None:
    body = b'{"object":"event"}'
    ts = 1_700_000_000
    both, ts_text = _signed(body, ts=ts, secrets=(OLD_SECRET, SECRET))
    assert verify_webhook_signature(SECRET, body, both, ts_text, now=ts)
    assert verify_webhook_signature(OLD_SECRET, body, both, ts_text, now=ts)
    spaced = both.replace(",", ", ").upper()
    assert verify_webhook_signature(SECRET, body, spaced, ts_text, now=ts)
    other = base64.b64encode(b"someone else").decode()
    assert not verify_webhook_signature(other, body, both, ts_text, now=ts)
    flood = ",".join(["0" * 64] * 20 + [both])
    assert not verify_webhook_signature(SECRET, body, flood, ts_text, now=ts)


# -- webhook bodies ------------------------------------------------------------------------------


def test_parse_event_returns_only_key_and_charge_id(fake: FakeOmise) -> None:
    charge = {
        "object": "charge",
        "id": "chrg_test_5abc",
        "status": "successful",
        "card": {"last_digits": "4242"},
    }
    assert parse_event(
        json.dumps({"object": "event", "key": "charge.complete", "data": charge}).encode()
    ) == EventRef("charge.complete", "chrg_test_5abc")
    refund = {"object": "refund", "id": "rfnd_test_1", "charge": "chrg_test_5abc"}
    assert parse_event(json.dumps({"object": "event", "key": "refund.create", "data": refund}).encode()) == (
        "refund.create",
        "chrg_test_5abc",
    )
    transfer = {"object": "transfer", "id": "trsf_test_1"}
    assert parse_event(
        json.dumps({"object": "event", "key": "transfer.create", "data": transfer}).encode()
    ) == (
        "transfer.create",
        None,
    )
    evil = {"object": "charge", "id": "chrg_test_1/../../accounts"}
    assert (
        parse_event(
            json.dumps({"object": "event", "key": "charge.complete", "data": evil}).encode()
        ).charge_id
        is None
    )


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"object":"charge"}', b'{"object":"event","key":5}']
)
def test_parse_event_rejects_non_events(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_event(body)


# -- webhook delivery through the fake, into a minimal verifying receiver ----------------------


async def _receiver(client: OmiseClient, credited: list[str], seen: list[str]) -> web.Application:
    """What the real route must do: verify, take ids only, fetch the charge, then decide."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_webhook_signature(
            SECRET,
            body,
            request.headers.get("Omise-Signature", ""),
            request.headers.get("Omise-Signature-Timestamp", ""),
            now=time.time(),
        ):
            return web.Response(status=401)
        ref = parse_event(body)
        if ref.charge_id is not None:
            charge = await client.retrieve_charge(ref.charge_id)
            seen.append(charge.status)
            if charge.status == "successful" and charge.paid and charge.id not in credited:
                credited.append(charge.id)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/webhooks/omise", handle)
    return app


@pytest.fixture
async def receiver(client: OmiseClient) -> AsyncIterator[tuple[str, list[str], list[str]]]:
    credited: list[str] = []
    seen: list[str] = []
    server = TestServer(await _receiver(client, credited, seen), host="127.0.0.1", port=0)
    await server.start_server()
    yield str(server.make_url("/webhooks/omise")), credited, seen
    await server.close()


async def test_signed_event_delivered_many_times_concurrently(
    client: OmiseClient, fake: FakeOmise, receiver: tuple[str, list[str], list[str]]
) -> None:
    url, credited, seen = receiver
    charge = await _card_charge(client, fake, CARD_SUCCESS)

    statuses = await fake.deliver_event(
        url, "charge.complete", charge.id, times=5, concurrent=True, sign_with=SECRET
    )

    assert statuses == [200] * 5 and seen == ["successful"] * 5
    assert credited == [charge.id]


async def test_unsigned_or_wrongly_signed_or_stale_events_are_refused(
    client: OmiseClient, fake: FakeOmise, receiver: tuple[str, list[str], list[str]]
) -> None:
    url, credited, seen = receiver
    charge = await _card_charge(client, fake, CARD_SUCCESS)

    assert await fake.deliver_event(url, "charge.complete", charge.id) == [401]
    assert await fake.deliver_event(url, "charge.complete", charge.id, sign_with=OLD_SECRET) == [401]
    stale = int(time.time()) - 3600
    assert await fake.deliver_event(url, "charge.complete", charge.id, sign_with=SECRET, timestamp=stale) == [
        401
    ]
    rotated = await fake.deliver_event(
        url, "charge.complete", charge.id, sign_with=OLD_SECRET, also_sign_with=SECRET
    )
    assert rotated == [200]
    assert seen == ["successful"] and credited == [charge.id]


async def test_forged_success_for_a_failed_charge_credits_nothing(
    client: OmiseClient, fake: FakeOmise, receiver: tuple[str, list[str], list[str]]
) -> None:
    url, credited, seen = receiver
    charge = await _card_charge(client, fake, CARD_INSUFFICIENT)
    forged = json.loads(fake.build_forged_event(charge.id))
    assert forged["data"]["status"] == "successful"  # the body lies...

    statuses = await fake.deliver_event(url, "charge.complete", charge.id, forged=True, sign_with=SECRET)

    assert statuses == [200]
    assert seen == ["failed"] and credited == []  # ...but Omise's own record is what counts


async def test_out_of_order_events_cannot_undo_the_real_status(
    client: OmiseClient, fake: FakeOmise, receiver: tuple[str, list[str], list[str]]
) -> None:
    url, credited, seen = receiver
    charge = await client.create_promptpay_charge(30000, "thb", RETURN_URI, {"topup_id": "tp_9"})
    stale_pending = fake.build_event("charge.create", charge.id)
    fake.mark_paid(charge.id)
    complete = fake.build_event("charge.complete", charge.id)

    statuses = await fake.deliver_events(url, [complete, stale_pending], sign_with=SECRET)

    assert statuses == [200, 200]
    assert seen == ["successful", "successful"] and credited == [charge.id]


def test_public_names_are_exported() -> None:
    for name in omise_api.__all__:
        assert hasattr(omise_api, name), name
