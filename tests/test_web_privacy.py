"""The privacy policy (seeds/000, sections 3, 4 and 8) as an acceptance test: the page states each
promise, and the code keeps it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from ledger.keys import Keyspace
from ledger.store import METERING_COLUMNS
from tests.fakes.oidc import FakeUser
from tests.web_harness import redis_dump, running_web, sqlite_dump

# (element id on the page, phrases it must state): one entry per promise of sections 3, 4 and 8.
PROMISES = [
    (
        "p-account",
        [
            "Google account email",
            "stable Google account identifier",
            "never see or store your Google password",
        ],
    ),
    (
        "p-keys",
        [
            "up to two API keys",
            "one-way",
            "exactly once, at creation or renewal",
            "cannot be recovered",
            "renew it",
        ],
    ),
    (
        "p-payments",
        ["Omise", "charge identifier", "amount", "charge status", "do not store your card number, CVV"],
    ),
    (
        "p-metering",
        [
            "token counts",
            "cache-hit",
            "cache-miss",
            "output",
            "the model used",
            "the charge",
            "credit buckets it was drawn from",
            "timestamps",
            "No content",
        ],
    ),
    ("p-history", ["top-up records", "current credit", "per-bucket expiry timestamps"]),
    (
        "p-buckets",
        ["expires 30 days after its top-up", "forfeited at expiry", "transaction record is retained"],
    ),
    ("p-metering-kept", ["retained for audit and", "dispute resolution"]),
    ("p-account-kept", ["retained until you close your account", "erases your email and Google identifier"]),
    ("p-close", ["close your account"]),
    ("p-refund", ["refund of unused balance", "30-day life"]),
    ("p-export", ["export your metering history", "CSV or JSON"]),
]


def section(page: str, element_id: str) -> str:
    start = page.index(f'id="{element_id}"')
    return " ".join(page[start : page.index("</li>", start)].split())


async def test_privacy_page_states_each_promise_of_sections_3_4_and_8(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        r = await w.browser().get("/privacy")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        page = r.text
        for element_id, phrases in PROMISES:
            text = section(page, element_id)
            for phrase in phrases:
                assert phrase in text, (element_id, phrase)
        # The metering promise lists exactly the columns the export carries.
        for column in METERING_COLUMNS:
            assert f"<code>{column}</code>" in section(page, "p-metering")
        assert "We do not store your prompt content" in page


async def test_only_email_and_sub_are_kept_from_google(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    user = FakeUser(sub="sub-only-this", email="kept@example.com")
    async with running_web(redis_client, clean_keyspace, tmp_path, user=user) as w:
        b = w.browser()
        await w.sign_in(b)
        account_id = (await b.get("/api/account")).json()["account_id"]
        await w.drain()
        rows = await asyncio.to_thread(
            w.store.query, "SELECT email, google_sub FROM accounts WHERE account_id = ?", (account_id,)
        )
        assert (rows[0][0], rows[0][1]) == ("kept@example.com", "sub-only-this")
        redis_values = await redis_dump(redis_client, clean_keyspace.prefix)
        sql_values = sqlite_dump(w.settings.history_target)
        # No Google token (ID or access token, both JWT-like or opaque) anywhere: nothing starts like a JWT.
        assert not any("eyJ" in v for v in redis_values + sql_values)
        # In Redis the sub is only an index hash, never the sub itself.
        assert not any("sub-only-this" in v for v in redis_values)
        assert sum("sub-only-this" in v for v in sql_values) == 1


@pytest.mark.parametrize("redis_kind", ["redis"], indirect=True)
async def test_request_content_is_stored_nowhere_and_usage_is_exportable(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b = w.browser()
        await w.sign_in(b)
        account_id = (await b.get("/api/account")).json()["account_id"]
        await w.ledger.credit(account_id, 10_000_000, reference="t", source="grant")
        key = (await b.post("/api/keys", headers={"X-CSRF-Token": await w.csrf(b)})).json()["key"]
        secret_prompt = "PROMPT-CANARY-9f3b2c please echo"
        async with AsyncOpenAI(base_url=w.url + "/v1", api_key=key, max_retries=0) as client:
            reply = await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": secret_prompt}]
            )
        answer = reply.choices[0].message.content or ""
        assert answer
        for _ in range(100):
            await w.drain()
            if (await b.get("/api/usage")).json()["rows"]:
                break
            await asyncio.sleep(0.02)
        export = await b.get("/api/usage/export?format=json")
        rows = orjson.loads(export.body)
        assert len(rows) == 1 and rows[0]["model"] == "demo" and rows[0]["output_tokens"] > 0
        everything = await redis_dump(redis_client, clean_keyspace.prefix) + sqlite_dump(w.settings.history_target)
        everything.append(export.text)
        for needle in ("CANARY", answer[:20]):
            assert not any(needle in v for v in everything), needle
