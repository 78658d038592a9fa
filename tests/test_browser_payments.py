"""A top-up and a refund in headless Chromium: card fields into (the stand-in) Omise.js, the fake bank's
3-D Secure page, back to the dashboard with the new bucket, then the refund. Screenshots go to
test-artifacts/browser-payments/."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from playwright.async_api import async_playwright

from ledger.keys import Keyspace
from tests.browser_harness import launch, screenshots
from tests.fakes.omise import CARD_3DS
from tests.payments_harness import running_payments

pytestmark = pytest.mark.browser

CANARY_NAME = "CANARY BROWSER HOLDER"
shot = screenshots("browser-payments")


@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_top_up_through_3ds_see_the_bucket_then_refund_it_in_a_real_browser(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path) as p:
        async with async_playwright() as pw:
            browser = await launch(pw)
            try:
                page = await browser.new_page()
                problems: list[str] = []
                # CSP refusals and script errors show up here; favicon misses are not ours to judge.
                page.on(
                    "console",
                    lambda m: (
                        problems.append(m.text)
                        if m.type == "error" and "favicon" not in m.location.get("url", "")
                        else None
                    ),
                )
                page.on("pageerror", lambda e: problems.append(str(e)))

                await page.goto(p.w.url + "/auth/google")  # the local issuer approves at once
                await page.wait_for_url(p.w.url + "/")
                await page.goto(p.w.url + "/topup")
                assert "Top up" in await page.inner_text("h1")
                # Card inputs carry no name: a form submission could never send them to us.
                assert (
                    await page.evaluate(
                        "document.querySelectorAll('#topup-form input[id^=card][name]').length"
                    )
                    == 0
                )
                await page.check('input[name="preset"][value="500"]')
                await page.fill("#card-name", CANARY_NAME)
                await page.fill("#card-number", CARD_3DS)
                await page.fill("#card-exp-month", "12")
                await page.fill("#card-exp-year", "2031")
                await page.fill("#card-cvc", "123")
                await shot(page, "01-topup-form")

                await page.click("#pay-card")
                await page.wait_for_url(p.fake.url + "/3ds/*")
                await shot(page, "02-fake-3ds")
                await page.click("text=Authenticate")
                await page.wait_for_url(p.w.url + "/topups/*/return")
                assert await page.get_attribute("#topup-outcome", "data-status") == "successful"
                assert "500.00 THB" in await page.inner_text("main")
                await shot(page, "03-return")

                await page.click("#back-to-dashboard")
                await page.wait_for_url(p.w.url + "/")
                assert (await page.inner_text("#available")).strip() == "500.00 THB"
                assert "Top-up" in await page.inner_text("#buckets")
                await shot(page, "04-dashboard-with-bucket")

                await page.goto(p.w.url + "/topup")
                assert "Paid" in await page.inner_text("#topup-history")
                await shot(page, "05-topup-page-with-bucket")
                await page.click("button.refund")
                await page.wait_for_selector("#refund-outcome")
                assert await page.get_attribute("#refund-outcome", "data-status") == "confirmed"
                await shot(page, "06-refunded")
                await page.goto(p.w.url + "/")
                assert (await page.inner_text("#available")).strip() == "0.00 THB"
                await shot(page, "07-dashboard-after-refund")
                assert problems == [], problems
            finally:
                await browser.close()

        [charge] = p.fake.charges.values()
        assert charge["amount"] == 50_000 and charge["refunded_amount"] == 50_000
        assert charge["card"]["name"] == CANARY_NAME  # the name went to Omise, and only there
        assert not any(CANARY_NAME.encode() in body for body in p.w.bodies)
        await p.reconciled()
