"""Usage from the dashboard: paged metering rows, per-day totals, and the streamed CSV/JSON export."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from ledger.store import METERING_COLUMNS
from tests.conftest import Clock
from tests.fakes.oidc import FakeUser
from tests.web_harness import Browser, WebGateway, running_web, settle_request


async def signed_in_with_credit(w: WebGateway, units: int = 100) -> tuple[Browser, str, str]:
    b = w.browser()
    await w.sign_in(b)
    account_id = (await b.get("/api/account")).json()["account_id"]
    await w.ledger.credit(account_id, units * 1_000_000, reference=f"t:{account_id}", source="grant")
    key = (await b.post("/api/keys", headers={"X-CSRF-Token": await w.csrf(b)})).json()
    return b, account_id, key["key_id"]


async def test_usage_pages_newest_first_and_totals_by_day_and_model(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path, clock=clock) as w:
        b, account_id, key_id = await signed_in_with_credit(w)
        ids = []
        for i in range(7):
            model = "demo" if i % 2 == 0 else "deepseek-chat"
            ids.append(
                await settle_request(
                    w.ledger, account_id, key_id, model=model, out=10 + i, charge_micro=1000 + i
                )
            )
            clock.advance(3600 * 5)  # spread over two days
        await w.drain()

        page1 = (await b.get("/api/usage?limit=3")).json()
        assert [r["request_id"] for r in page1["rows"]] == ids[::-1][:3]
        row = page1["rows"][0]
        assert set(METERING_COLUMNS) <= set(row)
        assert row["account_id"] == account_id and row["key_id"] == key_id
        assert row["output_tokens"] == 16 and row["charge_micro"] == 1006
        assert row["draws"] == [{"bucket_id": row["draws"][0]["bucket_id"], "amount_micro": 1006}]
        page2 = (await b.get(f"/api/usage?limit=3&before={page1['next_before']}")).json()
        page3 = (await b.get(f"/api/usage?limit=3&before={page2['next_before']}")).json()
        seen = [r["request_id"] for r in page1["rows"] + page2["rows"] + page3["rows"]]
        assert seen == ids[::-1] and page3["next_before"] is None
        assert (await b.get("/api/usage?limit=x")).status == 400

        daily = (await b.get("/api/usage/daily?days=30")).json()["totals"]
        assert sum(t["requests"] for t in daily) == 7
        assert sum(t["charge_micro"] for t in daily) == sum(1000 + i for i in range(7))
        assert {t["model"] for t in daily} == {"demo", "deepseek-chat"}
        assert len({t["day"] for t in daily}) >= 2

        html = (await b.get("/usage")).text
        assert 'id="daily-chart"' in html and "<rect" in html and 'id="usage-rows"' in html
        assert all(i in html for i in ids) and 'rel="next"' not in html  # 7 rows fit one page of 50
        older = (await b.get(f"/usage?before={page1['rows'][-1]['seq']}")).text
        assert ids[0] in older and ids[-1] not in older


async def test_usage_shows_only_the_signed_in_accounts_rows(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(
        redis_client, clean_keyspace, tmp_path, user=FakeUser(sub="a", email="a@x.example")
    ) as w:
        _, alice, alice_key = await signed_in_with_credit(w)
        await settle_request(w.ledger, alice, alice_key)
        w.issuer.user = FakeUser(sub="b", email="b@x.example")
        bob, _, _ = await signed_in_with_credit(w)
        await w.drain()
        assert (await bob.get("/api/usage")).json()["rows"] == []
        export = await bob.get("/api/usage/export?format=json")
        assert orjson.loads(export.body) == []


async def test_export_streams_the_whole_history_as_csv_and_json(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    async with running_web(redis_client, clean_keyspace, tmp_path) as w:
        b, account_id, key_id = await signed_in_with_credit(w)
        empty = await b.get("/api/usage/export?format=csv")
        assert empty.status == 200 and empty.text.strip() == ",".join(METERING_COLUMNS)
        # More rows than one read chunk, so the export really is read and written in pieces.
        n = 1203
        ids = [
            await settle_request(
                w.ledger, account_id, key_id, hit=i % 3, miss=100 + i, out=i, charge_micro=10 + i
            )
            for i in range(n)
        ]
        await w.drain()

        r = await b.get("/api/usage/export?format=csv")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/csv")
        assert r.headers["Content-Disposition"].startswith("attachment; filename=")
        assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed, not one buffered body
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == n
        assert [row["request_id"] for row in rows] == ids  # oldest first
        assert list(rows[0]) == list(METERING_COLUMNS)
        last = rows[-1]
        assert int(last["output_tokens"]) == n - 1 and int(last["charge_micro"]) == 10 + n - 1
        assert int(last["input_cache_miss_tokens"]) == 100 + n - 1
        assert orjson.loads(last["draws"])[0]["amount_micro"] == 10 + n - 1

        r = await b.get("/api/usage/export?format=json")
        assert r.headers["Content-Type"].startswith("application/json")
        data = orjson.loads(r.body)
        assert [d["request_id"] for d in data] == ids
        assert data[5]["input_cache_hit_tokens"] == 5 % 3 and data[5]["status"] == "ok"
        assert set(data[0]) == set(METERING_COLUMNS)

        assert (await b.get("/api/usage/export?format=xml")).status == 400
        assert (await w.browser().get("/api/usage/export?format=csv")).status == 401
