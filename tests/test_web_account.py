"""The account side: overview of balance and buckets, the low-balance alert, and account closure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from ledger.money import iso_ms
from ledger.reconcile import reconcile
from tests.conftest import Clock
from tests.fakes.oidc import FakeUser
from tests.web_harness import Browser, redis_dump, running_web, settle_request, sqlite_dump


def iso_ms_of(t: float) -> str:
    return str(iso_ms(int(t * 1000)))


EMAIL = "closing.person@example.com"
SUB = "google-sub-8675309"


async def account_id_of(b: Browser) -> str:
    account_id: str = (await b.get("/api/account")).json()["account_id"]
    return account_id


async def test_overview_shows_buckets_with_expiry_and_warns_within_seven_days(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path, clock=clock) as w:
        b = w.browser()
        await w.sign_in(b)
        acct = await account_id_of(b)
        await w.ledger.credit(acct, 100_000_000, reference="t1", source="topup")
        clock.advance(86400 * 10)
        await w.sign_in(b)  # sessions last at most 7 days
        await w.ledger.credit(acct, 20_500_000, reference="t2", source="topup")
        view = (await b.get("/api/account")).json()
        assert view["available_micro"] == 120_500_000 and view["warnings"] == []
        assert [x["amount_micro"] for x in view["buckets"]] == [100_000_000, 20_500_000]
        page = (await b.get("/")).text
        assert "120.50 THB" in page and 'id="buckets"' in page and 'role="alert"' not in page
        # 24 days after the first top-up, it expires within a week: a warning on the JSON and the page.
        clock.advance(86400 * 14)
        await w.sign_in(b)
        view = (await b.get("/api/account")).json()
        first = view["buckets"][0]
        assert first["expiring_soon"] is True and view["warnings"] == [
            f"bucket_expiring:{first['bucket_id']}"
        ]
        assert first["expires_at"] == iso_ms_of(clock.t - 86400 * 24 + 30 * 86400)
        page = (await b.get("/")).text
        assert 'class="warn-expiry"' in page and "100.00 THB of credit expires on" in page
        # Past its 30 days: unusable and shown as expired; the record stays.
        clock.advance(86400 * 7)
        await w.sign_in(b)
        view = (await b.get("/api/account")).json()
        assert view["available_micro"] == 20_500_000
        assert view["buckets"][0]["expired"] is True and view["buckets"][0]["remaining_micro"] == 0
        assert "20.50 THB" in (await b.get("/")).text


async def test_low_balance_alert_shows_on_dashboard_and_v1_balance_and_is_recorded_once_per_crossing(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        acct = await account_id_of(b)
        h = {"X-CSRF-Token": await w.csrf(b)}
        key = (await b.post("/api/keys", headers=h)).json()
        await w.ledger.credit(acct, 100_000_000, reference="t1", source="grant")
        for bad in ("abc", "-1", 1.5, True, "0.0000001"):
            r = await b.post("/api/account/low-balance", json={"amount": bad}, headers=h)
            assert r.status == 400 and r.json()["error"]["message"].startswith("'amount'"), bad
        r = await b.post("/api/account/low-balance", json={"amount": "50"}, headers=h)
        assert r.json() == {"low_threshold_micro": 50_000_000, "low_balance": False}

        async def v1_low() -> bool:
            r = await w.browser().get("/v1/balance", headers={"Authorization": f"Bearer {key['key']}"})
            low: bool = r.json()["low_balance"]
            return low

        for _ in range(3):  # 100 -> 70 -> 40 (crosses) -> 10 (still low: no second record)
            await settle_request(w.ledger, acct, key["key_id"], charge_micro=30_000_000)
        assert (await b.get("/api/account")).json()["low_balance"] is True
        assert await v1_low() is True
        assert 'id="warn-low"' in (await b.get("/")).text
        await w.ledger.credit(acct, 100_000_000, reference="t2", source="grant")  # 110: above again
        assert await v1_low() is False
        await settle_request(w.ledger, acct, key["key_id"], charge_micro=70_000_000)  # 40: crosses again
        await w.drain()
        events = await asyncio.to_thread(
            w.store.query,
            "SELECT available_micro, threshold_micro FROM low_balance_events WHERE account_id = ?",
            (acct,),
        )
        assert [(e[0], e[1]) for e in events] == [(40_000_000, 50_000_000), (40_000_000, 50_000_000)]
        # The form sets it too (no JavaScript); 0 switches it off.
        r = await b.post("/account/low-balance", data={"amount": "0", "csrf_token": h["X-CSRF-Token"]})
        assert r.status == 303
        assert (await b.get("/api/account")).json()["low_balance"] is False and await v1_low() is False


@pytest.mark.parametrize("via", ["api", "form"])
async def test_closing_removes_email_and_sub_revokes_keys_ends_session_and_reconciles(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, via: str
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path, user=FakeUser(sub=SUB, email=EMAIL)) as w:
        b = w.browser()
        await w.sign_in(b)
        acct = await account_id_of(b)
        token = await w.csrf(b)
        h = {"X-CSRF-Token": token}
        keys = [(await b.post("/api/keys", headers=h)).json() for _ in range(2)]
        await w.ledger.credit(acct, 10_000_000, reference="t1", source="topup")
        for _ in range(3):
            await settle_request(w.ledger, acct, keys[0]["key_id"], charge_micro=1_000_000)
        await w.drain()
        account_page = (await b.get("/account")).text
        assert "7.00 THB" in account_page and "is forfeited" in account_page and "refund" in account_page

        if via == "api":
            assert (await b.post("/api/account/close", json={}, headers=h)).status == 400
            assert (await b.post("/api/account/close", json={"confirm": "yes"}, headers=h)).status == 400
            r = await b.post("/api/account/close", json={"confirm": True}, headers=h)
            assert r.status == 200
            assert r.json() == {
                "account_id": acct,
                "closed": True,
                "refunds": [],  # Omise is not configured here: a grant is never refundable anyway
                "forfeited_micro": 7_000_000,
                "keys_revoked": 2,
            }
        else:
            r = await b.post("/account/close", data={"csrf_token": token})
            assert r.status == 400 and (await b.get("/api/account")).status == 200
            r = await b.post("/account/close", data={"csrf_token": token, "confirm": "yes"})
            assert r.status == 200 and "Your account is closed" in r.text
        # The session ended with it: the cookie is cleared, and the copy a browser may keep is refused.
        assert 'cp_session=""' in r.headers["Set-Cookie"] or "Max-Age=0" in r.headers["Set-Cookie"]
        assert (await b.get("/api/account")).status == 401
        for k in keys:
            got = await w.browser().get("/v1/balance", headers={"Authorization": f"Bearer {k['key']}"})
            assert got.status == 401

        await w.drain()
        for value in await redis_dump(redis_client, clean_keyspace.prefix):
            assert EMAIL not in value and SUB not in value
        sql = sqlite_dump(w.settings.history_target)
        assert not any(EMAIL in v or SUB in v for v in sql)
        # Metering and money records are kept for accounting (under the account id only).
        rows = await asyncio.to_thread(
            w.store.query, "SELECT count(*) FROM metering WHERE account_id = ?", (acct,)
        )
        assert rows[0][0] == 3
        report = await reconcile(w.ledger, w.store)
        assert report.ok, report.problems

        # Signing in again later makes a fresh account.
        again = w.browser()
        await w.sign_in(again)
        fresh = (await again.get("/api/account")).json()
        assert fresh["account_id"] != acct and fresh["available_micro"] == 0
        assert (await again.get("/api/keys")).json()["keys"] == []
