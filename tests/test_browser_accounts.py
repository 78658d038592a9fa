"""A person's whole path in headless Chromium: sign in through the local issuer, create and copy a key,
use it with the OpenAI SDK on the ``demo`` model, see the usage row, export CSV, close the account.
Screenshots of each page go to test-artifacts/."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from playwright.async_api import async_playwright

from ledger.keys import Keyspace
from ledger.reconcile import reconcile
from tests.browser_harness import launch, screenshots
from tests.fakes.oidc import FakeUser
from tests.web_harness import running_web

pytestmark = pytest.mark.browser

shot = screenshots("browser-accounts")


@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_sign_in_key_use_usage_export_and_close_in_a_real_browser(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    user = FakeUser(sub="browser-sub-1", email="browser.user@example.com")
    async with running_web(redis_client, clean_keyspace, tmp_path, user=user, issuer_auto_approve=False) as w:
        async with async_playwright() as pw:
            browser = await launch(pw)
            try:
                context = await browser.new_context(accept_downloads=True)
                await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=w.url)
                page = await context.new_page()

                # Sign in through the local issuer's own page.
                await page.goto(w.url + "/")
                await shot(page, "01-sign-in")
                await page.click("#google-signin")
                await page.wait_for_url(w.issuer.url + "/authorize*")
                await shot(page, "02-issuer")
                await page.click("text=Sign in as browser.user@example.com")
                await page.wait_for_url(w.url + "/")
                assert "Overview" in await page.inner_text("h1")
                account_id = (await w.ledger.find_account_by_sub("browser-sub-1")) or ""
                assert account_id
                await w.ledger.credit(account_id, 50_000_000, reference="browser-test", source="grant")
                await page.reload()
                assert (await page.inner_text("#available")).strip() == "50.00 THB"
                await shot(page, "03-overview")

                # Create a key and copy it.
                await page.click("nav >> text=API keys")
                await shot(page, "04-keys-empty")
                await page.click("#create-key")
                await page.wait_for_selector("#new-key")
                key = (await page.inner_text("#new-key")).strip()
                assert key.startswith("cpk_")
                await page.click("#copy-key")
                # A selector, not wait_for_function: our CSP forbids the eval that would need.
                await page.wait_for_selector(".copied:not(:empty)")
                copied = await page.evaluate("navigator.clipboard.readText()")
                assert copied == key
                assert f'ANTHROPIC_AUTH_TOKEN="{key}"' in await page.inner_text("#cfg-claude")
                await shot(page, "05-new-key")

                # Use it from a coding tool's SDK against the gateway's own demo model.
                async with AsyncOpenAI(base_url=w.url + "/v1", api_key=copied, max_retries=0) as client:
                    stream = await client.chat.completions.create(
                        model="demo", messages=[{"role": "user", "content": "hello"}], stream=True
                    )
                    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert "demo model" in text

                # The usage row appears once the journal worker has run.
                for _ in range(100):
                    await w.drain()
                    rows = await asyncio.to_thread(
                        w.store.query, "SELECT request_id FROM metering WHERE account_id = ?", (account_id,)
                    )
                    if rows:
                        break
                    await asyncio.sleep(0.05)
                request_id = rows[0][0]
                await page.click("nav >> text=Usage")
                assert request_id in await page.inner_text("#usage-rows")
                assert await page.locator("#daily-chart rect").count() >= 1
                await shot(page, "06-usage")

                # Export CSV as a download.
                async with page.expect_download() as info:
                    await page.click("#export-csv")
                download = await info.value
                assert download.suggested_filename.endswith(".csv")
                saved = await download.path()
                exported = list(csv.DictReader(io.StringIO(Path(saved).read_text())))
                assert [r["request_id"] for r in exported] == [request_id]
                assert exported[0]["model"] == "demo" and int(exported[0]["charge_micro"]) > 0

                await page.click("footer >> text=Privacy")
                await shot(page, "07-privacy")

                # Close the account.
                await page.click("nav >> text=Account")
                assert await page.inner_text("#email") == "browser.user@example.com"
                await shot(page, "08-account")
                await page.check("#confirm")
                await page.click("#close-account")
                await page.wait_for_selector("text=Your account is closed")
                await shot(page, "09-closed")
                await page.goto(w.url + "/")
                assert await page.locator("#google-signin").count() == 1

                r = await w.browser().get("/v1/balance", headers={"Authorization": f"Bearer {key}"})
                assert r.status == 401
                report = await reconcile(w.ledger, w.store)
                assert report.ok, report.problems
            finally:
                await browser.close()
