"""The ops CLI end to end: `python -m ledger ... --json` in a subprocess against a real Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from ledger.epoch import open_ledger
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from tests import history
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

    def audit(self) -> list[Any]:
        return history.rows(history.env_target(self.env), "SELECT * FROM audit_log ORDER BY id")


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    keyspace = Keyspace(prefix=prefix, shards=4)
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_PATH", "DATABASE_URL", "LEDGER_PREFIX")
    }
    env.update(history.history_env(tmp_path))
    env.update(
        REDIS_URL=REDIS_URL,
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
    target = history.env_target(cli.env)
    refused = (sqlite3.IntegrityError, psycopg.errors.RaiseException)
    with pytest.raises(refused, match="append-only"):
        history.execute(target, "UPDATE audit_log SET actor = 'mallory'")
    with pytest.raises(refused, match="append-only"):
        history.execute(target, "DELETE FROM audit_log")
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
            rows = history.rows(
                history.env_target(cli.env), "SELECT charge_micro FROM metering WHERE request_id = 'req_00w1'"
            )
        assert [tuple(r) for r in rows] == [(250_000,)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert await cli.ledger.redis.xlen(cli.ledger.keys.journal(int(account[4:6], 16))) == 0


# Runs `python -m ledger ARGS` in a process where importing the gateway package fails.
_WITHOUT_GATEWAY = """
import runpy, sys

class NoGateway:
    def find_spec(self, name, path=None, target=None):
        if name == "gateway" or name.startswith("gateway."):
            raise ModuleNotFoundError(f"No module named {name!r} (the test hid it)")
        return None

sys.meta_path.insert(0, NoGateway())
sys.argv = ["ledger", *sys.argv[1:]]
runpy.run_module("ledger", run_name="__main__", alter_sys=True)
"""


def test_the_ledger_package_imports_nothing_of_the_gateway() -> None:
    import ast

    for path in (ROOT / "ledger").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            assert not [n for n in names if n.split(".")[0] == "gateway"], f"{path.name} imports the gateway"


async def test_python_m_ledger_runs_with_the_gateway_package_unimportable(cli: Cli) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _WITHOUT_GATEWAY, *args],
            cwd=ROOT,
            env=cli.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # The hiding works: the gateway's own entry point fails in the same harness.
    hidden = subprocess.run(
        [sys.executable, "-c", _WITHOUT_GATEWAY.replace('"ledger"', '"gateway"'), "--help"],
        cwd=ROOT, env=cli.env, capture_output=True, text=True, timeout=60,
    )
    assert hidden.returncode != 0 and "the test hid it" in hidden.stderr
    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "reconcile" in helped.stdout and "refund" not in helped.stdout
    for args in (("migrate",), ("account", "create", "gina@example.com")):
        p = run(*args, "--json")
        assert p.returncode == 0, p.stderr
    account = json.loads(p.stdout)["account_id"]
    assert run("grant", account, "2", "--json").returncode == 0
    p = run("balance", account, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["available_micro"] == 2_000_000
    p = run("reconcile", "--json")
    assert p.returncode == 0, p.stderr + p.stdout


async def test_retried_account_create_key_create_and_grant_with_a_ref_happen_once(cli: Cli) -> None:
    first = cli.ok("account", "create", "hal@example.com", "--ref", "signup-7")
    assert cli.ok("account", "create", "hal@example.com", "--ref", "signup-7") == first
    account = first["account_id"]
    other = cli.ok("account", "create", "ida@example.com", "--ref", "signup-8")["account_id"]
    assert other != account and account in await cli.ledger.account_ids()

    key = cli.ok("key", "create", account, "--ref", "onboard")
    assert key["key"].startswith("cpk_")
    again = cli.run("key", "create", account, "--ref", "onboard", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"key_id": key["key_id"], "key": None}
    assert "shown then" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert [k.key_id for k in await cli.ledger.list_keys(account)] == [key["key_id"]]
    assert (await cli.ledger.lookup_key(key["key"])).key_id == key["key_id"]  # the first key still works

    grant = cli.ok("grant", account, "5", "--ref", "ticket-9", "--reason", "outage")
    assert cli.ok("grant", account, "5", "--ref", "ticket-9", "--reason", "outage") == grant
    changed = cli.run("grant", account, "6", "--ref", "ticket-9", "--json")
    assert changed.returncode == 1 and "already granted 5000000" in changed.stderr
    cli.ok("grant", other, "5", "--ref", "ticket-9")  # a reference is the account's own
    assert (await cli.ledger.balance(account)).available_micro == 5_000_000
    assert (await cli.ledger.balance(other)).available_micro == 5_000_000

    # Retries are still recognised after Redis was rebuilt from SQLite.
    cli.ok("rebuild", "--force")
    assert cli.ok("account", "create", "hal@example.com", "--ref", "signup-7") == first
    assert cli.ok("grant", account, "5", "--ref", "ticket-9") == grant
    assert json.loads(cli.run("key", "create", account, "--ref", "onboard", "--json").stdout)["key"] is None
    assert (await cli.ledger.balance(account)).available_micro == 5_000_000
    assert len(await cli.ledger.list_keys(account)) == 1
    assert cli.ok("reconcile")["ok"] is True
    grants = [json.loads(r["detail"]) for r in cli.audit() if r["action"] == "grant"]
    assert [(g.get("ref"), g.get("created")) for g in grants] == [
        ("ticket-9", True), ("ticket-9", False), ("ticket-9", True), ("ticket-9", False)
    ]


async def test_an_id_that_names_no_account_is_no_such_account_exit_1(cli: Cli) -> None:
    cli.ok("account", "create", "jan@example.com")
    for bad in ("not-an-id", "acc_zz", "acc_00ffffffffffffffff", "key_00ffffffffff", "", "acc_00\n"):
        for args in (("balance", bad), ("grant", bad, "1"), ("key", "create", bad)):
            p = cli.run(*args, "--json")
            assert (p.returncode, p.stdout) == (1, ""), (args, p.stderr)
            assert re.search(r"no such (active )?account$", p.stderr.strip()), p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
    for args in (("key", "revoke", "nonsense"), ("key", "renew", "acc_00ffffffffffffffff")):
        p = cli.run(*args, "--json")
        assert p.returncode == 1 and "no such live key" in p.stderr, p.stderr


async def test_a_partial_account_record_is_no_such_account_not_a_traceback(cli: Cli) -> None:
    ghost = "acc_00" + "ab" * 8
    # A stray field, as a hand-run HSET would leave: a record without a status is no account.
    await cli.ledger.redis.hset(cli.ledger.keys.pfx_for(ghost) + "a:" + ghost, "low", "1")
    for args in (("balance", ghost), ("grant", ghost, "1"), ("key", "create", ghost)):
        p = cli.run(*args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and re.search(r"no such (active )?account$", p.stderr)
    # A record with its status but missing counters answers what it has.
    await cli.ledger.redis.hset(cli.ledger.keys.pfx_for(ghost) + "a:" + ghost, "status", "active")
    p = cli.run("balance", ghost, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["available_micro"] == 0, p.stderr


class _MovedRedis(socketserver.ThreadingTCPServer):
    """One node of a Redis Cluster that holds none of our slots: PING works, every command is MOVED."""

    daemon_threads = True
    allow_reuse_address = True

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while True:
                line = self.rfile.readline()
                if not line.startswith(b"*"):
                    return
                args = []
                for _ in range(int(line[1:])):
                    size = int(self.rfile.readline()[1:])
                    args.append(self.rfile.read(size + 2)[:-2])
                name = args[0].upper()
                if name == b"PING":
                    self.wfile.write(b"+PONG\r\n")
                elif name in (b"CLIENT", b"SELECT"):
                    self.wfile.write(b"+OK\r\n")
                else:
                    self.wfile.write(b"-MOVED 3999 127.0.0.1:7001\r\n")

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self.Handler)


async def test_redis_errors_are_one_line_reasons(cli: Cli) -> None:
    server = _MovedRedis()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**cli.env, "REDIS_URL": f"redis://127.0.0.1:{server.server_address[1]}/0"}
        for args in (("balance", "acc_00ffffffffffffffff"), ("account", "create", "kim@example.com"), ("expire",)):
            p = cli.run(*args, env=env)
            assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
            assert len(p.stderr.strip().splitlines()) == 1 and "MOVED" in p.stderr
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: a one-line reason too.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p = cli.run("balance", "acc_00ffffffffffffffff", env={**cli.env, "REDIS_URL": f"redis://127.0.0.1:{dead}/0"})
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Redis" in p.stderr
