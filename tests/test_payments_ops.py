"""Top-up records in the ledger (Lua, journal, rebuild) and the operators' commands against the fake Omise."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.omise_api import OmiseClient
from gateway.payments.service import Payments
from ledger.epoch import open_ledger
from ledger.journal import JournalWorker
from ledger.keys import Keyspace, shard_of
from ledger.ledger import Ledger
from ledger.rebuild import rebuild
from ledger.reconcile import reconcile
from ledger.schema import _V1, pg_statements
from ledger.schema import split_sql as _split_sql
from ledger.store import Store
from tests import history
from tests.conftest import REDIS_URL, no_history
from tests.fakes.omise import CARD_PENDING, CARD_SUCCESS, FakeOmise
from tests.history import history_target

ROOT = Path(__file__).resolve().parent.parent
THB = 1_000_000


async def drain(ledger: Ledger, store: Store) -> None:
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    while await worker.drain_once():
        pass


async def test_topup_status_only_moves_forward_and_stays_tied_to_its_charge(ledger: Ledger) -> None:
    acct, _ = await ledger.create_account("t@example.com")
    t = await ledger.create_topup(acct, 500 * THB, amount_minor=50_000, currency="THB", method="card")
    assert (t.status, t.charge_id, t.currency) == ("pending", "", "thb")
    assert t.topup_id.startswith("top_") and shard_of(t.topup_id) == shard_of(acct)
    assert await ledger.update_topup(t.topup_id, "pending", charge_id="chrg_test_a") == ("ok", "pending")
    assert await ledger.update_topup(t.topup_id, "pending", charge_id="chrg_test_a") == ("same", "pending")
    assert await ledger.update_topup(t.topup_id, "failed", charge_id="chrg_test_b") == (
        "mismatch",
        "chrg_test_a",
    )
    assert await ledger.update_topup(
        t.topup_id, "failed", charge_id="chrg_test_a", failure_code="x", failure_message="declined"
    ) == ("ok", "failed")
    # A charge Omise settles after we gave up on it still credits; success is final.
    assert await ledger.update_topup(t.topup_id, "successful", bucket_id="bkt_1") == ("ok", "successful")
    assert await ledger.update_topup(t.topup_id, "expired") == ("same", "successful")
    after = await ledger.topup(t.topup_id)
    assert after is not None and (after.status, after.bucket_id, after.failure_code) == (
        "successful",
        "bkt_1",
        "",
    )
    assert await ledger.update_topup("top_00aaaaaaaaaaaaaaaaaa", "failed") == ("unknown", "")
    assert await ledger.pending_topups() == []
    closed, _ = await ledger.create_account("c@example.com")
    await ledger.close_account(closed)
    with pytest.raises(Exception, match="closed"):
        await ledger.create_topup(closed, THB, amount_minor=100, currency="thb", method="card")


async def test_topups_reach_sqlite_and_rebuild_restores_them(ledger: Ledger, tmp_path: Path) -> None:
    store = Store(history_target(tmp_path, "h.sqlite3"))
    store.migrate()
    acct, _ = await ledger.create_account("r@example.com")
    paid = await ledger.create_topup(acct, 100 * THB, amount_minor=10_000, currency="thb", method="card")
    credit = await ledger.credit(acct, 100 * THB, reference="omise:chrg_test_paid", source="topup")
    await ledger.update_topup(
        paid.topup_id, "successful", charge_id="chrg_test_paid", bucket_id=credit.bucket_id
    )
    waiting = await ledger.create_topup(
        acct, 300 * THB, amount_minor=30_000, currency="thb", method="promptpay"
    )
    await ledger.update_topup(waiting.topup_id, "pending", charge_id="chrg_test_wait")
    await drain(ledger, store)
    rows = {r["topup_id"]: dict(r) for r in store.query("SELECT * FROM topups")}
    assert (
        rows[paid.topup_id]["status"] == "successful" and rows[paid.topup_id]["bucket_id"] == credit.bucket_id
    )
    assert (
        rows[waiting.topup_id]["charge_id"] == "chrg_test_wait"
        and rows[waiting.topup_id]["method"] == "promptpay"
    )
    before = {t.topup_id: t for t in await ledger.topups(acct)}

    await rebuild(ledger, store, force=True)
    assert {t.topup_id: t for t in await ledger.topups(acct)} == before
    assert [t.topup_id for t in await ledger.pending_topups()] == [waiting.topup_id]
    assert (await reconcile(ledger, store)).ok
    store.close()


def test_migrate_upgrades_a_version_1_history(tmp_path: Path) -> None:
    s = Store(history_target(tmp_path, "old.sqlite3"))

    def version_1(conn: Any) -> None:
        for statement in _split_sql(_V1):
            for sql in pg_statements(statement) if s.postgres else [statement]:
                conn.execute(sql)
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")

    s.write(version_1)
    assert s.migrate() == 2
    assert s.query("SELECT count(*) FROM topups")[0][0] == 0
    s.close()


# ----- the ops CLI ------------------------------------------------------------------------------


@dataclass
class Ops:
    env: dict[str, str]
    db: Path
    ledger: Ledger
    fake: FakeOmise
    payments: Payments

    async def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        # A real subprocess; asynchronous, since the fake Omise it talks to runs on this loop.
        # `payments ...` is the gateway's (Omise) command group; the rest are the ledger's.
        module = "gateway" if args[:1] == ("payments",) else "ledger"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=ROOT,
            env=env or self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> object:
        code, out, err = await self.run(*args, "--json")
        assert code == 0, err
        return json.loads(out)

    def audit(self) -> list[Any]:
        return history.rows(history.env_target(self.env), "SELECT * FROM audit_log ORDER BY id")


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[Ops]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keyspace = Keyspace(prefix=prefix, shards=4)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    fake = FakeOmise()
    await fake.start()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "LEDGER_", "OMISE_"))
    }
    env.update(
        REDIS_URL=REDIS_URL,
        **history.history_env(tmp_path),
        LEDGER_PREFIX=prefix,
        LEDGER_SHARDS="4",
        LEDGER_ACTOR="ops-omar",
        OMISE_SECRET_KEY=fake.secret_key,
        OMISE_API_BASE=fake.url,
        PYTHONPATH=str(ROOT),
    )
    ledger = Ledger(client, keyspace)
    await ledger.load_scripts()
    await open_ledger(ledger, no_history)
    async with aiohttp.ClientSession() as http:
        omise = OmiseClient(fake.secret_key, http, api_base=fake.url)
        payments = Payments(ledger, omise, currency="THB", public_base_url="http://127.0.0.1:9")
        yield Ops(env, tmp_path / "gateway.sqlite3", ledger, fake, payments)
    await fake.close()
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_topups_sync_omise_and_refund_from_the_cli_write_the_audit_log(ops: Ops) -> None:
    acct, _ = await ops.ledger.create_account("ops@example.com")
    paid, _ = await ops.payments.start_topup(
        acct, 100 * THB, 10_000, token=ops.fake.create_token(CARD_PENDING)
    )
    lapsed, _ = await ops.payments.start_topup(acct, 50 * THB, 5_000, token=None)
    done, _ = await ops.payments.start_topup(
        acct, 200 * THB, 20_000, token=ops.fake.create_token(CARD_SUCCESS)
    )
    ops.fake.mark_paid(paid.charge_id)
    ops.fake.expire(lapsed.charge_id)

    pending = await ops.ok("topups", "--status", "pending")
    assert isinstance(pending, list) and {r["topup_id"] for r in pending} == {paid.topup_id, lapsed.topup_id}
    assert all(r["charge_id"].startswith("chrg_test_") for r in pending)

    report = await ops.ok("payments", "sync-omise")
    assert isinstance(report, dict)
    assert (report["checked"], report["credited"], report["failed"], report["still_pending"]) == (2, 1, 1, 0)
    assert await ops.ok("topups", "--status", "pending") == []
    rows = await ops.ok("topups", "--account", acct)
    assert isinstance(rows, list)
    by_id = {r["topup_id"]: r for r in rows}
    assert by_id[paid.topup_id]["status"] == "successful"
    assert (
        by_id[lapsed.topup_id]["status"] == "expired"
        and by_id[lapsed.topup_id]["failure_code"] == "expired_charge"
    )

    bucket_id = by_id[done.topup_id]["bucket_id"]
    refund = await ops.ok("payments", "refund", bucket_id, "--amount", "25")
    assert isinstance(refund, dict) and refund["status"] == "confirmed" and refund["amount_micro"] == 25 * THB
    assert ops.fake.charges[done.charge_id]["refunded_amount"] == 2_500

    ops.fake.fail_next_refund("failed_refund", "charge can't be refunded")
    before = await ops.ledger.account(acct)
    code, _, err = await ops.run("payments", "refund", bucket_id)
    assert code == 1 and "charge can't be refunded" in err
    assert await ops.ledger.account(acct) == before
    code, _, err = await ops.run("payments", "refund", "bkt_nonsense1234")
    assert code in (1, 2) and "bucket" in err

    no_key = {k: v for k, v in ops.env.items() if k != "OMISE_SECRET_KEY"}
    code, _, err = await ops.run("payments", "sync-omise", env=no_key)
    assert code == 1 and "OMISE_SECRET_KEY" in err
    # The Omise commands left the ledger's CLI (it knows no Omise): there they are bad usage.
    for gone in ("refund", "sync-omise"):
        code, out, _ = await ops.run(gone, bucket_id)
        assert code == 2 and out == ""

    actions = [(r["actor"], r["action"]) for r in ops.audit()]
    assert ("ops-omar", "topups.list") in actions and ("ops-omar", "omise.sync") in actions
    assert actions.count(("ops-omar", "refund")) == 2  # the confirmed one and the refused one
    store = Store(history.env_target(ops.env))
    assert (await reconcile(ops.ledger, store)).ok
    store.close()
