"""The runbook's drills, as an operator types them (docs/operations.md): the restore drill (off-site
SQLite copy -> rebuild -> reconcile on a scratch Redis) and `repair` for what reconcile flags."""

from __future__ import annotations

import uuid
from pathlib import Path

from ledger.keys import Keyspace
from tests.test_cli import Cli, cli  # noqa: F401 - the fixture
from tests.test_journal import metering


async def test_restore_drill_from_an_off_site_copy(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    account = cli.ok("account", "create", "drill@example.com")["account_id"]
    key = cli.ok("key", "create", account)
    cli.ok("grant", account, "50")
    # Traffic: a finished request and one still holding credit.
    await cli.ledger.reserve(account, "req_00d1", 2_000_000)
    await cli.ledger.settle(account, "req_00d1", 1_250_000, metering=metering("req_00d1", key["key_id"]))
    await cli.ledger.reserve(account, "req_00d2", 3_000_000)
    assert cli.ok("reconcile")["ok"] is True
    before = cli.ok("balance", account)

    # 1. The nightly off-site copy (a consistent snapshot while the worker writes).
    copy = tmp_path / "offsite" / "gateway-copy.sqlite3"
    copy.parent.mkdir()
    assert cli.ok("backup", str(copy))["accounts"] == 1
    assert cli.run("backup", str(copy)).returncode == 1  # never overwrites a copy

    # 2. The drill: the copy on a scratch Redis (here: a fresh prefix) and a scratch directory.
    scratch = {**cli.env, "DATABASE_PATH": str(copy), "LEDGER_PREFIX": f"d{uuid.uuid4().hex[:10]}"}
    refused = cli.run("balance", account, env=scratch)
    assert refused.returncode == 1 and "rebuild" in refused.stderr  # lost, and it says what to do
    assert cli.run("rebuild", "--json", env=scratch).returncode == 0
    reconciled = cli.run("reconcile", "--json", env=scratch)
    assert reconciled.returncode == 0, reconciled.stdout
    drilled = cli.run("balance", account, "--json", env=scratch)
    assert drilled.returncode == 0 and drilled.stdout.strip() == _json_line(before)
    scratch_keys = Keyspace(prefix=scratch["LEDGER_PREFIX"], shards=4)
    leftovers = [k async for k in cli.ledger.redis.scan_iter(match=scratch_keys.pattern())]
    await cli.ledger.redis.delete(*leftovers)


def _json_line(obj: dict[str, object]) -> str:
    import orjson

    return orjson.dumps(obj).decode()


async def test_repair_fixes_what_reconcile_flags_and_audits_it(cli: Cli) -> None:  # noqa: F811
    account = cli.ok("account", "create", "repair@example.com")["account_id"]
    bucket = cli.ok("grant", account, "10")["bucket_id"]
    await cli.ledger.reserve(account, "req_00e1", 1_000_000)
    assert cli.ok("repair") == {"ok": True, "rebuilt": False, "problems_before": [], "problems_after": []}
    # Damage: a balance changed outside the scripts, a hold whose record vanished.
    pfx = cli.ledger.keys.pfx_for(account)
    await cli.ledger.redis.hincrby(pfx + "b:" + bucket, "remaining", 7)
    await cli.ledger.redis.delete(pfx + "r:req_00e1")
    assert cli.run("reconcile").returncode == 1
    fixed = cli.ok("repair")
    assert fixed["ok"] is True and fixed["rebuilt"] is True and fixed["problems_before"]
    assert cli.ok("reconcile")["ok"] is True
    balance = cli.ok("balance", account)
    assert (balance["available_micro"], balance["reserved_micro"]) == (9_000_000, 1_000_000)
    actions = [r["action"] for r in cli.audit()]
    assert actions[-2:] == ["rebuild", "repair"]
    # The restored hold is still settled by its request.
    done = await cli.ledger.settle(account, "req_00e1", 400_000, metering=metering("req_00e1", ""))
    assert done.charged_micro == 400_000
    assert cli.ok("reconcile")["ok"] is True
