"""The credit history: every money event once, in order, paged, exported as CSV and JSON, and adding up."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from ledger.keys import Keyspace
from ledger.store import HISTORY_COLUMNS
from tests.conftest import Clock
from tests.fakes.oidc import FakeUser
from tests.fakes.omise import CARD_INSUFFICIENT, CARD_SUCCESS
from tests.payments_harness import PaymentsGateway, running_payments
from tests.web_harness import settle_request, sqlite_dump

THB = 1_000_000
EMAIL = "history-owner@x.example"


async def _one_of_each(p: PaymentsGateway, clock: Clock) -> dict[str, Any]:
    """A grant, a failed and a good top-up, a request, a partial refund, a refused refund, an expiry."""
    ledger = p.w.ledger
    grant = await ledger.credit(p.account_id, 20 * THB, reference="grant-h1", source="grant", life_s=3600)
    clock.advance(1)
    failed = await p.topup(100, token=p.fake.create_token(CARD_INSUFFICIENT))
    assert failed["status"] == "failed"
    clock.advance(1)
    good = await p.topup(500, token=p.fake.create_token(CARD_SUCCESS))
    assert good["status"] == "successful"
    clock.advance(1)
    key = (await p.browser.post("/api/keys", headers=p.csrf)).json()
    # Drawn from the grant first: it expires soonest.
    await settle_request(ledger, p.account_id, key["key_id"], charge_micro=12_345_678)
    clock.advance(1)
    partial = await p.browser.post(
        f"/api/buckets/{good['bucket_id']}/refund", json={"amount": "7.5"}, headers=p.csrf
    )
    assert partial.status == 200 and partial.json()["status"] == "confirmed"
    clock.advance(1)
    p.fake.fail_next_refund("failed_refund", "charge can't be refunded")
    refused = await p.browser.post(f"/api/buckets/{good['bucket_id']}/refund", headers=p.csrf)
    assert refused.status == 409
    clock.advance(7200)  # the grant's hour is over
    assert (await ledger.expire())[1] == 20 * THB - 12_345_678
    await p.w.drain()
    return {
        "grant": grant.bucket_id,
        "failed": failed,
        "good": good,
        "partial": partial.json(),
        "charge": p.charge_of(good["topup_id"]),
    }


async def _conserved(p: PaymentsGateway, rows: list[dict[str, Any]]) -> None:
    """What the history adds up to is what the ledger holds: available + reserved + consumed."""
    info = await p.w.ledger.account(p.account_id)
    bal = await p.w.ledger.balance(p.account_id)
    assert info is not None
    assert sum(r["delta_micro"] for r in rows) == bal.available_micro + bal.reserved_micro + info.consumed
    credits = sum(r["amount_micro"] for r in rows if r["kind"] == "credit")
    refunds = sum(r["amount_micro"] for r in rows if r["kind"] == "refund" and r["status"] == "confirmed")
    forfeits = sum(r["amount_micro"] for r in rows if r["kind"] == "forfeit")
    assert (credits, refunds, forfeits) == (info.credited, info.refunded, info.forfeited)


async def test_history_lists_each_money_event_once_in_order_and_adds_up(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, clock=clock) as p:
        ev = await _one_of_each(p, clock)
        r = await p.browser.get("/api/history")
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        page = r.json()
        assert page["currency"] == "THB" and page["next_before"] is None
        rows = page["rows"][::-1]  # oldest first from here
        assert [(x["kind"], x["status"]) for x in rows] == [
            ("credit", "credited"),
            ("topup", "failed"),
            ("credit", "credited"),
            ("refund", "confirmed"),
            ("refund", "reverted"),
            ("forfeit", "expired"),
        ]
        assert len({x["event_id"] for x in rows}) == 6
        grant, failed, topup, partial, refused, forfeit = rows
        assert (grant["bucket_id"], grant["source"], grant["amount_micro"], grant["delta_micro"]) == (
            ev["grant"],
            "grant",
            20 * THB,
            20 * THB,
        )
        assert grant["topup_id"] is None and grant["charge_id"] is None
        assert (failed["topup_id"], failed["failure_code"]) == (ev["failed"]["topup_id"], "insufficient_fund")
        assert (failed["amount_micro"], failed["delta_micro"], failed["bucket_id"]) == (100 * THB, 0, None)
        # The successful top-up is its credit, linked to the top-up and Omise's charge.
        assert (topup["bucket_id"], topup["source"], topup["amount_micro"]) == (
            ev["good"]["bucket_id"],
            "topup",
            500 * THB,
        )
        assert (topup["topup_id"], topup["charge_id"]) == (ev["good"]["topup_id"], ev["charge"])
        assert topup["expires_at"].endswith("Z") and topup["at"].endswith("Z")
        assert (partial["refund_id"], partial["amount_micro"], partial["delta_micro"]) == (
            ev["partial"]["refund_id"],
            7_500_000,
            -7_500_000,
        )
        # Refused: the whole rest was asked for, and nothing moved in the end.
        assert (refused["amount_micro"], refused["delta_micro"], refused["failure_code"]) == (
            492_500_000,
            0,
            "failed_refund",
        )
        assert refused["bucket_id"] == ev["good"]["bucket_id"]
        assert (forfeit["bucket_id"], forfeit["amount_micro"], forfeit["delta_micro"]) == (
            ev["grant"],
            20 * THB - 12_345_678,
            -(20 * THB - 12_345_678),
        )
        assert [x["at"] for x in rows] == sorted(x["at"] for x in rows)
        assert all(x["description"] for x in rows) and "insufficient_fund" in failed["description"]
        await _conserved(p, rows)
        await p.reconciled()

        # Paged newest first with a stable cursor; the pages join up to the whole list.
        first = (await p.browser.get("/api/history?limit=4")).json()
        second = (await p.browser.get(f"/api/history?limit=4&before={first['next_before']}")).json()
        assert len(first["rows"]) == 4 and second["next_before"] is None
        assert first["rows"] + second["rows"] == page["rows"]
        assert (await p.browser.get("/api/history?limit=x")).status == 400
        bad = await p.browser.get("/api/history?before=not-a-cursor")
        assert bad.status == 400 and "before" in bad.json()["error"]["message"]

        # The page: a table, the export links, no script needed; paged by the same cursor.
        html = (await p.browser.get("/history")).text
        assert 'id="history-rows"' in html and 'href="/api/history/export?format=csv"' in html
        assert all(x["event_id"] in html for x in rows) and 'rel="next"' not in html
        assert '<a href="/history" aria-current="page">' in html
        older = (await p.browser.get(f"/history?before={first['rows'][-1]['cursor']}")).text
        assert rows[0]["event_id"] in older and rows[-1]["event_id"] not in older
        assert (await p.browser.get("/history?before=zzz")).status == 400


async def test_history_export_csv_and_json_hold_the_same_rows_as_the_api(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, clock=clock) as p:
        await _one_of_each(p, clock)
        api_rows = [
            {k: v for k, v in x.items() if k != "cursor"}
            for x in (await p.browser.get("/api/history")).json()["rows"][::-1]
        ]

        r = await p.browser.get("/api/history/export?format=json")
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert r.headers["Content-Disposition"].startswith('attachment; filename="credit-history-')
        assert r.headers.get("Transfer-Encoding") == "chunked"
        data = orjson.loads(r.body)
        assert data == api_rows and list(data[0]) == list(HISTORY_COLUMNS)

        r = await p.browser.get("/api/history/export?format=csv")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert list(table[0]) == list(HISTORY_COLUMNS)
        assert table == [{k: "" if v is None else str(v) for k, v in x.items()} for x in api_rows]
        await _conserved(p, data)

        assert (await p.browser.get("/api/history/export?format=xml")).status == 400
        assert (await p.w.browser().get("/api/history/export?format=csv")).status == 401
        assert (await p.w.browser().get("/api/history")).status == 401
        assert (await p.w.browser().get("/history")).status == 303


async def test_export_reads_more_rows_than_one_chunk_in_order(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, clock=clock) as p:
        # Many credits in the same millisecond: the cursor's tie-break keeps them apart.
        n = 1103
        for i in range(n):
            await p.w.ledger.credit(p.account_id, THB + i, reference=f"g{i}", source="grant")
            if i % 100 == 0:
                clock.advance(0.001)
        await p.w.drain()
        data = orjson.loads((await p.browser.get("/api/history/export?format=json")).body)
        assert len(data) == n and len({d["event_id"] for d in data}) == n
        assert sum(d["amount_micro"] for d in data) == n * THB + n * (n - 1) // 2
        assert [(d["at"], d["event_id"]) for d in data] == sorted((d["at"], d["event_id"]) for d in data)
        rows = (await p.browser.get("/api/history/export?format=csv")).text
        assert len(list(csv.DictReader(io.StringIO(rows)))) == n
        paged: list[str] = []
        before = ""
        while True:
            page = (await p.browser.get(f"/api/history?limit=200&before={before}")).json()
            paged += [x["event_id"] for x in page["rows"]]
            if page["next_before"] is None:
                break
            before = page["next_before"]
        assert paged == [d["event_id"] for d in data][::-1]


async def test_another_accounts_history_is_not_visible(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(
        redis_client, clean_keyspace, tmp_path, clock=clock, user=FakeUser(sub="a", email="a@x.example")
    ) as p:
        await _one_of_each(p, clock)
        p.w.issuer.user = FakeUser(sub="b", email="b@x.example")
        bob = p.w.browser()
        await p.w.sign_in(bob)
        bob_id = (await bob.get("/api/account")).json()["account_id"]
        assert bob_id != p.account_id
        await p.w.ledger.credit(bob_id, 3 * THB, reference="grant-bob", source="trial")
        await p.w.drain()
        [only] = (await bob.get("/api/history")).json()["rows"]
        assert (only["source"], only["amount_micro"]) == ("trial", 3 * THB)
        assert orjson.loads((await bob.get("/api/history/export?format=json")).body) == [
            {k: v for k, v in only.items() if k != "cursor"}
        ]
        # Alice's cursor in Bob's hands pages Bob's history only.
        alice = (await p.browser.get("/api/history?limit=1")).json()
        assert (await bob.get(f"/api/history?before={alice['next_before']}")).json()["rows"] in ([], [only])
        html = (await bob.get("/history")).text
        assert only["event_id"] in html and p.account_id not in html
        assert len((await p.browser.get("/api/history")).json()["rows"]) == 6


async def test_closing_keeps_the_history_rows_without_the_email(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(
        redis_client, clean_keyspace, tmp_path, clock=clock, user=FakeUser(sub="c", email=EMAIL)
    ) as p:
        await _one_of_each(p, clock)
        before = (await p.browser.get("/api/history")).json()["rows"]
        clock.advance(1)
        r = await p.browser.post("/api/account/close", json={"confirm": True}, headers=p.csrf)
        assert r.status == 200, r.text
        await p.w.drain()
        assert (await p.browser.get("/api/history")).status == 401  # signed out

        rows = list(p.w.store.iter_history(p.account_id))
        assert [x["event_id"] for x in rows[: len(before)]] == [x["event_id"] for x in before][::-1]
        closing = rows[len(before) :]
        # The rest of the top-up is refunded first (in whole satang); nothing else is left to forfeit.
        assert [(x["kind"], x["status"]) for x in closing] == [("refund", "confirmed")]
        assert closing[0]["amount_micro"] == 492_500_000
        assert all(EMAIL not in str(v) for x in rows for v in x.values())
        assert EMAIL not in sqlite_dump(p.w.settings.history_target)
        info = await p.w.ledger.account(p.account_id)
        assert info is not None and info.status == "closed"
        assert sum(x["delta_micro"] for x in rows) == info.consumed  # nothing available any more
        await p.reconciled()


async def test_closing_forfeits_unrefundable_credit_and_says_so(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path, clock: Clock
) -> None:
    async with running_payments(redis_client, clean_keyspace, tmp_path, clock=clock) as p:
        grant = await p.w.ledger.credit(p.account_id, 5 * THB, reference="grant-c", source="grant")
        clock.advance(1)
        assert (
            await p.browser.post("/api/account/close", json={"confirm": True}, headers=p.csrf)
        ).status == 200
        await p.w.drain()
        credit, forfeit = p.w.store.iter_history(p.account_id)
        assert (credit["kind"], forfeit["kind"], forfeit["status"]) == ("credit", "forfeit", "account_closed")
        assert forfeit["bucket_id"] == grant.bucket_id and forfeit["delta_micro"] == -5 * THB
        assert "closed" in forfeit["description"]
