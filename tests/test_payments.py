"""Top-ups, webhooks and refunds over real HTTP: the app, the fake Omise on loopback, both Redis kinds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.payments.sync import sync_pending
from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import DEFAULT_BUCKET_LIFE_S
from tests.conftest import Clock
from tests.fakes.omise import CARD_3DS, CARD_INSUFFICIENT, CARD_PENDING, CARD_SUCCESS
from tests.payments_harness import running_payments
from tests.web_harness import redis_dump, running_web, sqlite_dump

# Also on a real Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

THB = 1_000_000
SATANG = 10_000


async def test_card_topup_credits_a_30_day_bucket_and_sends_satang_and_our_topup_id(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(500, token=p.fake.create_token(CARD_SUCCESS))
        assert answer["status"] == "successful" and answer["amount_micro"] == 500 * THB
        topup_id = answer["topup_id"]
        assert topup_id.startswith("top_") and shard_of(topup_id) == shard_of(p.account_id)

        sent = p.fake.requests_to("POST", "/charges")[0]
        assert sent.body["amount"] == 50_000 and sent.body["currency"] == "thb"
        assert sent.body["metadata"] == {"topup_id": topup_id}
        assert sent.body["return_uri"] == f"{p.w.url}/topups/{topup_id}/return"
        assert sent.idempotency_key == f"topup:{topup_id}"

        account = await p.account()
        assert account["available_micro"] == 500 * THB
        [bucket] = account["buckets"]
        assert bucket["bucket_id"] == answer["bucket_id"] and bucket["source"] == "topup"
        b = await p.w.ledger.bucket(bucket["bucket_id"])
        assert b is not None and b.reference == f"omise:{p.charge_of(topup_id)}"
        assert b.expires_at - b.created_at == DEFAULT_BUCKET_LIFE_S * 1000

        listed = (await p.browser.get("/api/topups")).json()
        assert listed["enabled"] and listed["presets"] == [100, 300, 500, 1000]
        assert [t["status"] for t in listed["topups"]] == ["successful"]
        await p.w.drain()
        [row] = p.w.store.query("SELECT * FROM topups")
        assert (row["topup_id"], row["status"], row["amount_minor"], row["currency"]) == (
            topup_id,
            "successful",
            50_000,
            "thb",
        )
        assert row["charge_id"] == p.charge_of(topup_id) and row["bucket_id"] == answer["bucket_id"]
        await p.reconciled()


async def test_webhook_delivered_five_times_concurrently_credits_one_bucket(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(300, token=p.fake.create_token(CARD_PENDING))
        assert answer["status"] == "pending"
        charge_id = p.charge_of(answer["topup_id"])
        # A delivery before Omise settles the charge credits nothing.
        assert await p.webhook(charge_id) == [200]
        assert (await p.account())["available_micro"] == 0

        p.fake.mark_paid(charge_id)
        statuses = await p.webhook(charge_id, times=5, concurrent=True)
        assert statuses == [200] * 5
        account = await p.account()
        assert account["available_micro"] == 300 * THB and len(account["buckets"]) == 1
        info = await p.w.ledger.account(p.account_id)
        assert info is not None and info.credited == 300 * THB
        # Every delivery asked Omise itself.
        assert len(p.fake.requests_to("GET", f"/charges/{charge_id}")) == 6
        await p.reconciled()


async def test_forged_webhook_for_a_failed_charge_credits_nothing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(500, token=p.fake.create_token(CARD_INSUFFICIENT))
        assert answer["status"] == "failed" and answer["failure_code"] == "insufficient_fund"
        assert "insufficient funds" in answer["failure_message"]
        charge_id = p.charge_of(answer["topup_id"])

        # Signed with our secret (as if the secret leaked) and claiming success: Omise says failed.
        assert await p.webhook(charge_id, forged=True, times=3) == [200] * 3
        # Unsigned, badly signed and stale deliveries are refused outright.
        assert await p.webhook(charge_id, forged=True, sign_with=None) == [401]
        other = "c2lnbmVkLXdpdGgtYW5vdGhlci1zZWNyZXQtMDEyMzQ1Njc="
        assert await p.webhook(charge_id, forged=True, sign_with=other) == [401]
        assert await p.webhook(charge_id, forged=True, timestamp=1_000_000_000) == [401]

        account = await p.account()
        assert account["available_micro"] == 0 and account["buckets"] == []
        topup = (await p.browser.get(f"/api/topups/{answer['topup_id']}")).json()
        assert topup["status"] == "failed" and topup["failure_code"] == "insufficient_fund"
        await p.reconciled()


async def test_webhook_for_a_charge_that_is_not_ours_credits_nothing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(500, token=p.fake.create_token(CARD_PENDING))
        charge_id = p.charge_of(answer["topup_id"])
        # Omise's own record says another amount than the top-up asked for: no credit.
        p.fake.charges[charge_id]["amount"] = 5_000_000
        p.fake.mark_paid(charge_id)
        assert await p.webhook(charge_id) == [200]
        # A successful charge whose metadata names no top-up of ours.
        foreign = p.fake.create_token(CARD_SUCCESS)
        charge = await p.payments.omise.create_card_charge(
            100_00, "thb", foreign, p.w.url + "/x", {"topup_id": "top_00000000000000000000000"}
        )
        assert await p.webhook(charge.id) == [200]
        assert (await p.account())["available_micro"] == 0
        await p.reconciled()


async def test_3ds_return_then_webhook_credits_once_and_the_page_shows_it(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(1000, token=p.fake.create_token(CARD_3DS))
        assert answer["status"] == "pending" and answer["authorize_uri"].startswith(p.fake.url + "/3ds/")
        # The payer authenticates at the bank's page and is sent back to our return page.
        done = await p.browser.post(answer["authorize_uri"], data={"outcome": "success"})
        assert done.status == 302 and done.headers["Location"] == answer["return_uri"]
        page = await p.browser.get(done.headers["Location"])
        assert page.status == 200 and 'data-status="successful"' in page.text
        assert "1000.00 THB" in page.text

        charge_id = p.charge_of(answer["topup_id"])
        assert await p.webhook(charge_id, times=2) == [200, 200]
        again = await p.browser.get(answer["return_uri"])
        assert 'data-status="successful"' in again.text
        account = await p.account()
        assert account["available_micro"] == 1000 * THB and len(account["buckets"]) == 1
        await p.reconciled()


async def test_3ds_failure_shows_omises_reason_and_credits_nothing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(100, token=p.fake.create_token(CARD_3DS))
        done = await p.browser.post(answer["authorize_uri"], data={"outcome": "failure"})
        page = await p.browser.get(done.headers["Location"])
        assert page.status == 200 and 'data-status="failed"' in page.text
        assert "3-D Secure authentication failed" in page.text and "failed_processing" in page.text
        history = await p.browser.get("/topup")
        assert "3-D Secure authentication failed" in history.text
        assert (await p.account())["available_micro"] == 0
        await p.reconciled()


async def test_promptpay_topup_shows_a_qr_and_credits_when_paid(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup("250.50", method="promptpay")
        assert answer["status"] == "pending" and answer["qr"].startswith(p.fake.url + "/qr/")
        assert p.fake.requests_to("POST", "/sources")[0].body["amount"] == 25_050
        polled = (await p.browser.get(f"/api/topups/{answer['topup_id']}")).json()
        assert polled["status"] == "pending"
        page = await p.browser.get(answer["return_uri"])
        assert 'data-status="pending"' in page.text and answer["qr"] in page.text
        assert 'http-equiv="refresh"' in page.text

        p.fake.mark_paid(p.charge_of(answer["topup_id"]))
        polled = (await p.browser.get(f"/api/topups/{answer['topup_id']}")).json()
        assert polled["status"] == "successful"
        assert (await p.account())["available_micro"] == 250_500_000
        await p.reconciled()


async def test_topup_requests_are_checked_before_omise_is_asked(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        token = p.fake.create_token(CARD_SUCCESS)
        for body, field in (
            ({"amount": 10, "token": token}, "between 20 and 100000"),
            ({"amount": 100_001, "token": token}, "between 20 and 100000"),
            ({"amount": "20.001", "token": token}, "decimals"),
            ({"amount": True, "token": token}, "'amount'"),
            ({"token": token}, "'amount' is required"),
            ({"amount": 100}, "'token'"),
            ({"amount": 100, "method": "bitcoin"}, "'method'"),
            ({"amount": 100, "token": "4242424242424242"}, "token"),
        ):
            r = await p.browser.post("/api/topups", json=body, headers=p.csrf)
            assert r.status == 400 and field in r.json()["error"]["message"], (body, r.text)
        assert (await p.browser.post("/api/topups", json={"amount": 100, "token": token})).status == 403
        signed_out = p.w.browser()
        assert (await signed_out.post("/api/topups", json={"amount": 100, "token": token})).status == 401
        assert p.fake.requests_to("POST", "/charges") == []
        # A used token: Omise refuses, the top-up is recorded as failed with Omise's reason.
        await p.topup(100, token=token)
        again = await p.topup(100, token=token)
        assert again["status"] == "failed" and again["failure_code"] == "used_token"
        await p.reconciled()


async def test_without_omise_keys_topups_say_not_configured(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        h = {"X-CSRF-Token": await w.csrf(b)}
        r = await b.post("/api/topups", json={"amount": 100, "method": "promptpay"}, headers=h)
        assert r.status == 503 and "not configured" in r.json()["error"]["message"]
        page = await b.get("/topup")
        assert page.status == 200 and 'id="topup-unconfigured"' in page.text
        assert (await b.get("/api/topups")).json()["enabled"] is False
        assert (await b.post("/webhooks/omise", data=b"{}")).status == 503


async def test_refund_of_a_partly_used_bucket_pays_back_whole_satang_of_the_rest(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(100, token=p.fake.create_token(CARD_SUCCESS))
        bucket_id = answer["bucket_id"]
        ledger = p.w.ledger
        # Spend 12.345678 THB: 87.654322 THB remain, 87.65 THB of it refundable.
        req = new_request_id(shard_of(p.account_id))
        await ledger.reserve(p.account_id, req, 12_345_678)
        await ledger.settle(p.account_id, req, 12_345_678, metering={"request_id": req})

        partial = await p.browser.post(
            f"/api/buckets/{bucket_id}/refund", json={"amount": "7.5"}, headers=p.csrf
        )
        assert partial.status == 200 and partial.json()["amount_micro"] == 7_500_000
        assert partial.json()["status"] == "confirmed" and partial.json()["omise_refund_id"].startswith(
            "rfnd_"
        )
        rest = await p.browser.post(f"/api/buckets/{bucket_id}/refund", headers=p.csrf)
        assert rest.status == 200 and rest.json()["amount_micro"] == 80_150_000
        charge = p.fake.charges[p.charge_of(answer["topup_id"])]
        assert [r["amount"] for r in charge["refunds"]["data"]] == [750, 8015]
        b = await ledger.bucket(bucket_id)
        assert b is not None and b.remaining_micro == 4_322  # the sub-satang remainder stays
        info = await ledger.account(p.account_id)
        assert info is not None and info.refunded == 87_650_000

        nothing = await p.browser.post(f"/api/buckets/{bucket_id}/refund", headers=p.csrf)
        assert nothing.status == 409 and "not refundable" in nothing.json()["error"]["message"]
        sub_satang = await p.browser.post(
            f"/api/buckets/{bucket_id}/refund", json={"amount": "0.000001"}, headers=p.csrf
        )
        assert sub_satang.status == 400
        await p.w.drain()
        rows = p.w.store.query("SELECT status, amount_micro, external_ref FROM refunds ORDER BY created_ms")
        assert [(r["status"], r["amount_micro"]) for r in rows] == [
            ("confirmed", 7_500_000),
            ("confirmed", 80_150_000),
        ]
        assert all(r["external_ref"].startswith("rfnd_") for r in rows)
        await p.reconciled()


async def test_only_own_unexpired_topup_buckets_are_refundable(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, clock=clock) as p:
        ledger = p.w.ledger
        grant = await ledger.credit(p.account_id, 50 * THB, reference="grant-x", source="grant")
        r = await p.browser.post(f"/api/buckets/{grant.bucket_id}/refund", headers=p.csrf)
        assert r.status == 409 and "top-up" in r.json()["error"]["message"]
        other, _ = await ledger.create_account("other@example.com")
        theirs = await ledger.credit(other, 50 * THB, reference="omise:chrg_test_other", source="topup")
        r = await p.browser.post(f"/api/buckets/{theirs.bucket_id}/refund", headers=p.csrf)
        assert r.status == 404
        r = await p.browser.post("/api/buckets/bkt_nonsense/refund", headers=p.csrf)
        assert r.status == 404
        assert (await p.browser.post(f"/api/buckets/{theirs.bucket_id}/refund")).status == 403

        answer = await p.topup(100, token=p.fake.create_token(CARD_SUCCESS))
        clock.advance(DEFAULT_BUCKET_LIFE_S + 1)
        await p.w.sign_in(p.browser)  # sessions last a week; the bucket a month
        fresh = {"X-CSRF-Token": await p.w.csrf(p.browser)}
        expired = await p.browser.post(f"/api/buckets/{answer['bucket_id']}/refund", headers=fresh)
        assert expired.status == 409 and "expired" in expired.json()["error"]["message"]
        assert p.fake.requests_to("POST", f"/charges/{p.charge_of(answer['topup_id'])}/refunds") == []
        await ledger.expire()
        await p.reconciled()


async def test_omise_refund_failure_leaves_the_ledger_as_it_was(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(200, token=p.fake.create_token(CARD_SUCCESS))
        before = await p.w.ledger.account(p.account_id)
        p.fake.fail_next_refund("failed_refund", "charge can't be refunded")
        r = await p.browser.post(f"/api/buckets/{answer['bucket_id']}/refund", headers=p.csrf)
        assert r.status == 409 and "charge can't be refunded" in r.json()["error"]["message"]
        after = await p.w.ledger.account(p.account_id)
        assert after == before
        b = await p.w.ledger.bucket(answer["bucket_id"])
        assert b is not None and b.remaining_micro == 200 * THB
        assert (await p.account())["available_micro"] == 200 * THB
        await p.w.drain()
        [row] = p.w.store.query("SELECT status, external_ref FROM refunds")
        assert (row["status"], row["external_ref"]) == ("reverted", "error:failed_refund")

        # The HTML form shows Omise's reason too.
        p.fake.fail_next_refund("failed_refund", "the charge is under dispute")
        page = await p.browser.post(
            f"/topup/buckets/{answer['bucket_id']}/refund", data={"csrf_token": p.csrf["X-CSRF-Token"]}
        )
        assert page.status == 409 and "the charge is under dispute" in page.text
        assert await p.w.ledger.account(p.account_id) == before
        await p.reconciled()


async def test_refund_racing_with_spending_never_exceeds_the_bucket(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(100, token=p.fake.create_token(CARD_SUCCESS))
        ledger = p.w.ledger

        async def spend(i: int) -> int:
            req = new_request_id(shard_of(p.account_id))
            try:
                await ledger.reserve(p.account_id, req, 15 * THB)
            except Exception:
                return 0
            await asyncio.sleep(0.001 * (i % 3))
            return (
                await ledger.settle(p.account_id, req, 15 * THB, metering={"request_id": req})
            ).charged_micro

        async def refund() -> int:
            r = await p.browser.post(f"/api/buckets/{answer['bucket_id']}/refund", headers=p.csrf)
            return int(r.json()["amount_micro"]) if r.status == 200 else 0

        results = await asyncio.gather(
            *(spend(i) for i in range(8)), refund(), *(spend(i) for i in range(8, 12))
        )
        spent = sum(results[:8]) + sum(results[9:])
        refunded = results[8]
        assert spent + refunded <= 100 * THB
        info = await ledger.account(p.account_id)
        assert info is not None and info.consumed == spent and info.refunded == refunded
        charge = p.fake.charges[p.charge_of(answer["topup_id"])]
        assert charge["refunded_amount"] * SATANG == refunded
        await p.reconciled()


async def test_sync_credits_a_paid_charge_whose_webhook_never_came_and_fails_an_expired_one(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        paid = await p.topup(100, token=p.fake.create_token(CARD_PENDING))
        lapsed = await p.topup(300, method="promptpay")
        waiting = await p.topup(500, token=p.fake.create_token(CARD_PENDING))
        p.fake.mark_paid(p.charge_of(paid["topup_id"]))
        p.fake.expire(p.charge_of(lapsed["topup_id"]))

        report = await sync_pending(p.payments)
        assert (report.checked, report.credited, report.failed, report.still_pending) == (3, 1, 1, 1)
        statuses = {t["topup_id"]: t["status"] for t in (await p.browser.get("/api/topups")).json()["topups"]}
        assert statuses == {
            paid["topup_id"]: "successful",
            lapsed["topup_id"]: "expired",
            waiting["topup_id"]: "pending",
        }
        assert (await p.account())["available_micro"] == 100 * THB
        # Nothing pending is older than a minute yet: the background pass would leave them alone.
        assert (await sync_pending(p.payments, older_than_s=60)).checked == 0
        await p.reconciled()


async def test_canary_card_number_and_holder_name_reach_no_store_and_no_log(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary_number, canary_name = "4532015112830366", "CANARY ZEBRAWOOD HOLDER"
    caplog.set_level(logging.DEBUG)
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        first = await p.topup(
            150, token=p.fake.create_token(canary_number, name=canary_name, security_code="987")
        )
        three_ds = await p.topup(
            120, token=p.fake.create_token(CARD_3DS, name=canary_name, security_code="987")
        )
        await p.browser.post(three_ds["authorize_uri"], data={"outcome": "success"})
        await p.browser.get(three_ds["return_uri"])
        await p.webhook(p.charge_of(first["topup_id"]), times=2)
        await p.browser.post(f"/api/buckets/{first['bucket_id']}/refund", json={"amount": 50}, headers=p.csrf)
        await p.browser.get("/topup")
        await p.w.drain()
        await p.reconciled()
        # The canary did reach Omise (the fake keeps card details on its charges).
        card = p.fake.charges[p.charge_of(first["topup_id"])]["card"]
        assert card["name"] == canary_name and card["last_digits"] == canary_number[-4:]
        fingerprint = card["fingerprint"]

        stored = await redis_dump(redis_client, clean_keyspace.prefix)
        stored += sqlite_dump(p.w.settings.history_target)
        stored += [b.decode("utf-8", "replace") for b in p.w.bodies]
        logged = [r.getMessage() for r in caplog.records]
        for canary in (canary_number, canary_name, fingerprint, "ZEBRAWOOD"):
            assert not any(canary in v for v in stored), f"{canary} stored"
            assert not any(canary in line for line in logged), f"{canary} logged"
        assert len(stored) > 50 and any(first["topup_id"] in v for v in stored)


async def test_closing_the_account_refunds_unused_topup_credit_first(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        answer = await p.topup(300, token=p.fake.create_token(CARD_SUCCESS))
        await p.w.ledger.credit(p.account_id, 5 * THB, reference="support-grant", source="grant")
        charge_id = p.charge_of(answer["topup_id"])

        # Omise refuses: the account stays open and nothing moves.
        p.fake.fail_next_refund("failed_refund", "charge can't be refunded")
        r = await p.browser.post("/api/account/close", json={"confirm": True}, headers=p.csrf)
        assert r.status == 409 and "still open" in r.json()["error"]["message"]
        info = await p.w.ledger.account(p.account_id)
        assert info is not None and info.status == "active" and info.refunded == 0

        r = await p.browser.post("/api/account/close", json={"confirm": True}, headers=p.csrf)
        assert r.status == 200
        closed = r.json()
        assert [x["amount_micro"] for x in closed["refunds"]] == [300 * THB]
        assert closed["forfeited_micro"] == 5 * THB  # the grant was never refundable
        refunds = p.fake.requests_to("POST", f"/charges/{charge_id}/refunds")
        assert refunds[-1].body["amount"] == 30_000
        info = await p.w.ledger.account(p.account_id)
        assert info is not None and info.status == "closed" and info.refunded == 300 * THB
        await p.reconciled()
