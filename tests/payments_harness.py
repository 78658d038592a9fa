"""A running gateway wired to the fake Omise on loopback, with one signed-in browser.

async with running_payments(redis_client, keyspace, tmp_path) as p:
    r = await p.browser.post("/api/topups", json={...}, headers=p.csrf)
    await p.webhook(charge_id)               # a signed charge.complete delivery
    await p.reconciled()                     # drains the journal, asserts conservation
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from gateway.payments import PAYMENTS, Payments
from ledger.keys import Keyspace
from ledger.reconcile import reconcile
from tests.fakes.oidc import FakeUser
from tests.fakes.omise import FakeOmise
from tests.web_harness import Browser, WebGateway, running_web

WEBHOOK_SECRET = base64.b64encode(b"payments-webhook-secret-0123456789").decode()


@dataclass
class PaymentsGateway:
    w: WebGateway
    fake: FakeOmise
    browser: Browser
    csrf: dict[str, str]
    account_id: str

    @property
    def payments(self) -> Payments:
        return self.w.app[PAYMENTS]

    @property
    def webhook_url(self) -> str:
        return self.w.url + "/webhooks/omise"

    async def topup(self, amount: Any = 500, *, token: str | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"amount": amount, **extra}
        if token is not None:
            body["token"] = token
        r = await self.browser.post("/api/topups", json=body, headers=self.csrf)
        assert r.status == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    async def webhook(
        self, charge_id: str, *, times: int = 1, concurrent: bool = False, **kw: Any
    ) -> list[int]:
        kw.setdefault("sign_with", WEBHOOK_SECRET)
        return await self.fake.deliver_event(
            self.webhook_url, "charge.complete", charge_id, times=times, concurrent=concurrent, **kw
        )

    def charge_of(self, topup_id: str) -> str:
        for charge_id, charge in self.fake.charges.items():
            if charge["metadata"].get("topup_id") == topup_id:
                return charge_id
        raise AssertionError(f"no charge for {topup_id}")

    async def account(self) -> dict[str, Any]:
        r = await self.browser.get("/api/account")
        assert r.status == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def reconciled(self) -> None:
        report = await reconcile(self.w.ledger, self.w.store)
        assert report.ok, report.problems


@contextlib.asynccontextmanager
async def running_payments(
    redis: Redis,
    keyspace: Keyspace,
    tmp_path: Path,
    *,
    webhook_secret: str | None = WEBHOOK_SECRET,
    clock: Callable[[], float] | None = None,
    user: FakeUser | None = None,
    **overrides: Any,
) -> AsyncIterator[PaymentsGateway]:
    fake = FakeOmise()
    await fake.start()
    try:
        async with running_web(
            redis,
            keyspace,
            tmp_path,
            user=user,
            clock=clock,
            omise_public_key=fake.public_key,
            omise_secret_key=fake.secret_key,
            omise_api_base=fake.url,
            omise_webhook_secret=webhook_secret,
            **overrides,
        ) as w:
            browser = w.browser()
            await w.sign_in(browser)
            token = await w.csrf(browser)
            account_id = (await browser.get("/api/account")).json()["account_id"]
            yield PaymentsGateway(w, fake, browser, {"X-CSRF-Token": token}, account_id)
    finally:
        await fake.close()
