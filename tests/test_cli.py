"""The ops CLI end to end: `python -m ledger ... --json` in a subprocess against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.epoch import open_ledger
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from tests.conftest import REDIS_URL, no_history
from tests.test_journal import metering

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cli:
    env: dict[str, str]
    db: Path
    ledger: Ledger

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ledger", *args],
            cwd=ROOT,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str) -> dict:
        p = self.run(*args, "--json")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def audit(self) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM audit_log ORDER BY id").fetchall()
        conn.close()
        return rows


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keyspace = Keyspace(prefix=prefix, shards=4)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_PATH", "LEDGER_PREFIX")}
    env.update(
        REDIS_URL=REDIS_URL,
        DATABASE_PATH=str(tmp_path / "gateway.sqlite3"),
        LEDGER_PREFIX=prefix,
        LEDGER_SHARDS="4",
        LEDGER_ACTOR="ops-alice",
        PYTHONPATH=str(ROOT),
    )
    led = Ledger(client, keyspace)
    await open_ledger(led, no_history)
    yield Cli(env=env, db=tmp_path / "gateway.sqlite3", ledger=led)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_accounts_keys_grant_balance_and_audit(cli: Cli) -> None:
    assert cli.ok("migrate") == {"version": 2}
    account = cli.ok("account", "create", "alice@example.com")["account_id"]
    first = cli.ok("key", "create", account)
    assert set(first) == {"key_id", "key"} and first["key"].startswith("cpk_")
    second = cli.ok("key", "create", account)
    refused = cli.run("key", "create", account, "--json")
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "at most 2 live API keys" in refused.stderr

    renewed = cli.ok("key", "renew", first["key_id"])
    assert await cli.ledger.lookup_key(first["key"]) is None
    assert (await cli.ledger.lookup_key(renewed["key"])).account_id == account
    assert cli.ok("key", "revoke", second["key_id"]) == {"key_id": second["key_id"]}
    assert await cli.ledger.lookup_key(second["key"]) is None

    grant = cli.ok("grant", account, "12.5", "--expires-in", "3600", "--reason", "support ticket 42")
    assert grant["amount_micro"] == 12_500_000 and grant["expires_at"].endswith("Z")
    # --json is accepted anywhere.
    p = cli.run("--json", "balance", account)
    assert p.returncode == 0, p.stderr
    balance = json.loads(p.stdout)
    assert balance == {
        "account_id": account,
        "currency": "THB",
        "available_micro": 12_500_000,
        "reserved_micro": 0,
        "buckets": [
            {
                "bucket_id": grant["bucket_id"],
                "amount_micro": 12_500_000,
                "remaining_micro": 12_500_000,
                "expires_at": grant["expires_at"],
                "source": "grant",
            }
        ],
    }
    human = cli.run("balance", account)
    assert human.returncode == 0 and "available_micro: 12500000" in human.stdout

    rows = cli.audit()
    assert [r["action"] for r in rows] == [
        "account.create",
        "key.create",
        "key.create",
        "key.renew",
        "key.revoke",
        "grant",
    ]
    assert all(r["actor"] == "ops-alice" and r["at"].endswith("Z") for r in rows)
    assert all("alice@example.com" not in r["detail"] for r in rows)  # no personal data
    assert json.loads(rows[-1]["detail"]) == {
        "bucket_id": grant["bucket_id"],
        "amount_micro": 12_500_000,
        "expires_at": grant["expires_at"],
        "reason": "support ticket 42",
    }
    assert rows[1]["target"] == account and json.loads(rows[1]["detail"])["key_id"] == first["key_id"]

    # The audit log is append-only.
    conn = sqlite3.connect(cli.db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_log SET actor = 'mallory'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log")
    conn.close()
    assert len(cli.audit()) == 6


async def test_usage_exports_metering_rows(cli: Cli) -> None:
    account = cli.ok("account", "create", "bob@example.com")["account_id"]
    key = cli.ok("key", "create", account)
    cli.ok("grant", account, "10")
    for i, out in enumerate((5, 7)):
        req = f"req_00cli{i}"
        await cli.ledger.reserve(account, req, 1_000_000, key_id=key["key_id"])
        await cli.ledger.settle(account, req, 300_000 + i, metering=metering(req, key["key_id"], out=out))

    p = cli.run("usage", account, "--format", "csv")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("request_id,account_id,key_id,model,provider,upstream_model,")
    assert len(lines) == 3 and lines[1].startswith(f"req_00cli0,{account},{key['key_id']},demo,")
    p = cli.run("usage", account, "--format", "jsonl", "--json")
    rows = [json.loads(x) for x in p.stdout.strip().splitlines()]
    assert [r["charge_micro"] for r in rows] == [300_000, 300_001]
    assert rows[1]["output_tokens"] == 7 and rows[1]["draws"][0]["amount_micro"] == 300_001
    assert "some_future_field" not in rows[0]
    assert [r["request_id"] for r in cli.ok("usage", account)] == ["req_00cli0", "req_00cli1"]
    assert cli.run("usage", "acc_00ffffffffffffffff").returncode == 1


async def test_bad_usage_exits_2_and_refusals_exit_1(cli: Cli) -> None:
    account = cli.ok("account", "create", "carol@example.com")["account_id"]
    for args in (
        ("grant", account, "1.0000001"),
        ("grant", account, "-3"),
        ("grant", account, "ten"),
        ("grant", account, "1", "--expires-in", "0"),
        ("grant", account),
        ("nonsense",),
        (),
        ("usage", account, "--format", "xml"),
        ("key", "create", "not-an-id"),
    ):
        p = cli.run(*args, "--json")
        assert p.returncode == 2, (args, p.stderr)
        assert p.stdout == ""
    for args in (
        ("grant", "acc_00ffffffffffffffff", "1"),
        ("key", "revoke", "key_00ffffffffff"),
        ("balance", "acc_00ffffffffffffffff"),
        ("rebuild",),  # the ledger's keys exist
    ):
        p = cli.run(*args, "--json")
        assert p.returncode == 1, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1


async def test_reconcile_expire_and_rebuild_after_redis_loss(cli: Cli) -> None:
    account = cli.ok("account", "create", "dave@example.com")["account_id"]
    key = cli.ok("key", "create", account)
    cli.ok("grant", account, "5")
    cli.ok("grant", account, "2", "--expires-in", "1")
    await cli.ledger.reserve(account, "req_00d1", 1_000_000, key_id=key["key_id"])
    await cli.ledger.settle(account, "req_00d1", 400_000, metering=metering("req_00d1", key["key_id"]))
    assert cli.ok("reconcile") == {"ok": True, "accounts": 1, "problems": []}
    time.sleep(1.1)
    expired = cli.ok("expire")
    assert expired["buckets"] >= 1 and expired["forfeited_micro"] > 0
    before = cli.ok("balance", account)

    # Corrupt Redis: reconcile says so and exits 1.
    bucket = before["buckets"][0]["bucket_id"]
    await cli.ledger.redis.hincrby(cli.ledger.keys.pfx_for(bucket) + "b:" + bucket, "remaining", 1)
    red = cli.run("reconcile", "--json")
    assert red.returncode == 1 and json.loads(red.stdout)["ok"] is False
    assert "problem" in red.stderr
    await cli.ledger.redis.hincrby(cli.ledger.keys.pfx_for(bucket) + "b:" + bucket, "remaining", -1)

    # Redis loss: flush the ledger's keys, rebuild, reconcile is green and balances match.
    keys = [k async for k in cli.ledger.redis.scan_iter(match=cli.ledger.keys.pattern())]
    await cli.ledger.redis.delete(*keys)
    assert cli.ok("rebuild") == {"accounts": 1, "buckets": 2}
    assert cli.ok("reconcile")["ok"] is True
    assert cli.ok("balance", account) == before
    ref = await cli.ledger.lookup_key(key["key"])
    assert ref is not None and ref.key_id == key["key_id"]
    assert cli.audit()[-1]["action"] == "rebuild"
    assert cli.ok("rebuild", "--force") == {"accounts": 1, "buckets": 2}
    assert cli.ok("reconcile")["ok"] is True


async def test_embedded_url_file_is_used_when_redis_url_is_unset(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "REDIS_URL"}
    p = cli.run("balance", "acc_00ffffffffffffffff", env=env)
    assert p.returncode == 1 and "REDIS_URL is not set" in p.stderr and "embedded-redis.url" in p.stderr
    (cli.db.parent / "embedded-redis.url").write_text(REDIS_URL + "\n")
    p = cli.run("account", "create", "erin@example.com", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert (await cli.ledger.account(json.loads(p.stdout)["account_id"])) is not None


async def test_worker_drains_until_sigterm(cli: Cli) -> None:
    account = cli.ok("account", "create", "frank@example.com")["account_id"]
    cli.ok("grant", account, "3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", "worker", "--interval", "0.05"],
        cwd=ROOT,
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await cli.ledger.settle(account, "req_00w1", 250_000, metering=metering("req_00w1", ""))
        deadline = time.monotonic() + 20
        rows: list = []
        while time.monotonic() < deadline and not rows:
            time.sleep(0.1)
            conn = sqlite3.connect(cli.db)
            rows = conn.execute("SELECT charge_micro FROM metering WHERE request_id = 'req_00w1'").fetchall()
            conn.close()
        assert rows == [(250_000,)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert await cli.ledger.redis.xlen(cli.ledger.keys.journal(int(account[4:6], 16))) == 0
