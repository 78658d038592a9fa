"""The ledger on a real Redis Cluster (3 primaries, a replica each): detection from any node, the slot
discipline of the Lua scripts, the ops CLI, and a primary lost under load (killed, or failed over).

The ledger, journal, rebuild, reconcile, proxy and SDK-client suites also run on this cluster
(ON_CLUSTER in those modules); this module holds what only a cluster can show."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ledger.epoch import open_ledger
from ledger.journal import JournalWorker
from ledger.keys import Keyspace, new_request_id, shard_of
from ledger.ledger import Ledger
from ledger.reconcile import drain_all, reconcile
from ledger.redis_client import BoundedCluster, connect, delete_keys, scan_keys
from ledger.scripts import SCRIPT_NAMES, script_source
from ledger.store import Store
from tests.conftest import REDIS_URL, no_history
from tests.fakes.upstream import FakeUpstream, FakeUsage, Script
from tests.gateway_harness import running_gateway
from tests.ledger_invariants import check_conservation
from tests.redis_cluster import LocalCluster
from tests.test_journal import metering
from tests.test_proxy_faults import body_for, headers_for, path_for

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 16  # the default: enough shards that every primary holds some


@pytest.fixture
async def cluster_ledger(redis_cluster: LocalCluster) -> AsyncIterator[Ledger]:
    client = await connect(redis_cluster.url)
    keyspace = Keyspace(prefix=f"t{uuid.uuid4().hex[:10]}", shards=SHARDS)
    ledger = Ledger(client, keyspace)
    await ledger.load_scripts()
    await open_ledger(ledger, no_history)  # a new ledger: its epoch markers
    yield ledger
    await delete_keys(client, [k async for k in scan_keys(client, f"{keyspace.prefix}:*")])
    await client.aclose()


async def test_any_node_of_the_cluster_gives_a_cluster_client_and_a_single_server_a_plain_one(
    redis_cluster: LocalCluster,
) -> None:
    for port in redis_cluster.live():  # primaries and replicas alike
        client = await connect(f"redis://127.0.0.1:{port}/0")
        try:
            assert isinstance(client, BoundedCluster)
            assert len(client.get_primaries()) == 3
        finally:
            await client.aclose()
    single = await connect(REDIS_URL)
    try:
        assert not isinstance(single, RedisCluster)
        assert await single.ping()
    finally:
        await single.aclose()


async def test_the_cluster_refuses_a_script_that_strays_from_its_slot(cluster_ledger: Ledger) -> None:
    """Redis 7 stops a script touching a key outside the slot of its first key. So every ledger test
    that passes on this cluster (ON_CLUSTER) shows its scripts never stray from their shard's slot."""
    r = cluster_ledger.redis
    pfx0, pfx1 = (cluster_ledger.keys.shard_prefix(s) for s in (0, 1))
    stray = "redis.call('SET', KEYS[1], '1'); redis.call('SET', ARGV[1], '1'); return 1"
    with pytest.raises(ResponseError, match=r"same slot|non local key"):
        await r.eval(stray, 1, pfx0 + "x", pfx1 + "x")
    # The ledger's scripts each declare exactly one key, their shard's journal, and build the rest
    # from its hash-tagged prefix.
    for name in SCRIPT_NAMES:
        src = script_source(name)
        assert "KEYS[2]" not in src and "local PFX = string.sub(KEYS[1], 1, -2)" in src


async def test_scripts_are_reloaded_on_a_node_that_lost_them(
    cluster_ledger: Ledger, redis_cluster: LocalCluster
) -> None:
    """A promoted replica starts with an empty script cache (SCRIPT LOAD is not replicated):
    flushing every primary's cache is the same situation, and the NOSCRIPT fallback covers it."""
    ledger = cluster_ledger
    acct, _ = await ledger.create_account("flush@example.com")
    await ledger.redis.script_flush()  # sent to every primary
    assert not any(await ledger.redis.script_exists(ledger._scripts._scripts["credit"].sha))
    await ledger.credit(acct, 1_000_000, reference="after-flush", source="grant")
    assert (await ledger.balance(acct)).available_micro == 1_000_000


async def test_accounts_of_every_shard_spread_over_every_primary(cluster_ledger: Ledger) -> None:
    ledger = cluster_ledger
    r = ledger.redis
    nodes = {r.get_node_from_key(ledger.keys.journal(s)).name for s in ledger.keys.all_shards()}
    assert len(nodes) == 3
    accounts = [(await ledger.create_account(f"u{i}@example.com"))[0] for i in range(40)]
    assert sorted(accounts) == await ledger.account_ids()
    # SCAN visits every primary: each account's hash is found.
    found = {k.rsplit(":", 1)[1] async for k in scan_keys(r, f"{ledger.keys.prefix}:*:a:acc_*") if ":" in k}
    assert set(accounts) <= found


async def test_256_concurrent_commands_wait_for_the_bound_instead_of_failing(cluster_ledger: Ledger) -> None:
    ledger = cluster_ledger
    acct, _ = await ledger.create_account("burst@example.com")
    await ledger.credit(acct, 10_000_000, reference="burst", source="grant")
    got = await asyncio.gather(*(ledger.balance(acct) for _ in range(256)), return_exceptions=True)
    assert all(not isinstance(g, BaseException) and g.available_micro == 10_000_000 for g in got)


# ----- the ops CLI against any node ------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


async def test_the_ops_cli_works_with_redis_url_at_any_node(redis_cluster: LocalCluster, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    nodes = [f"redis://127.0.0.1:{p}/0" for p in redis_cluster.live()]
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_PATH", "LEDGER_PREFIX")}
    base.update(DATABASE_PATH=str(tmp_path / "g.sqlite3"), LEDGER_PREFIX=prefix, LEDGER_SHARDS="16",
                PYTHONPATH=str(ROOT))
    turn = iter(range(1000))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # Each command names another node: primary or replica, the CLI finds the cluster.
        return _cli({**base, "REDIS_URL": nodes[next(turn) % len(nodes)]}, *args)

    def ok(*args: str) -> Any:
        p = run(*args)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    try:
        accounts = [ok("account", "create", f"ops{i}@example.com")["account_id"] for i in range(6)]
        assert len({shard_of(a) for a in accounts}) > 1
        for i, acct in enumerate(accounts):
            ok("grant", acct, str(10 + i))
            ok("key", "create", acct)
        assert ok("balance", accounts[3])["available_micro"] == 13_000_000
        assert ok("reconcile")["ok"] is True

        refused = run("rebuild")  # the ledger is live: refused in one line, no traceback
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
        assert "Traceback" not in refused.stderr
        assert ok("rebuild", "--force")["accounts"] == 6
        assert ok("balance", accounts[5])["available_micro"] == 15_000_000
        assert ok("reconcile")["ok"] is True

        unknown = run("balance", "acc_00" + "0" * 16)
        assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
        down = _cli({**base, "REDIS_URL": "redis://127.0.0.1:1/0"}, "balance", accounts[0])
        assert down.returncode == 1 and "Traceback" not in down.stderr
        assert len(down.stderr.strip().splitlines()) == 1
    finally:
        client = await connect(nodes[0])
        await delete_keys(client, [k async for k in scan_keys(client, f"{prefix}:*")])
        await client.aclose()


# ----- a primary lost under load ---------------------------------------------------------------


@dataclass
class Load:
    """Reserve/settle pairs on many accounts over every shard, with the journal worker draining."""

    ledger: Ledger
    accounts: list[str]
    settled: dict[str, int] = field(default_factory=dict)  # request id -> charge, acknowledged
    done: int = 0
    errors: list[str] = field(default_factory=list)  # exception names, for the report
    slowest_s: float = 0.0  # the longest pair: how long the failover held calls (for the report)

    async def pair(self, rng: random.Random) -> None:
        acct = rng.choice(self.accounts)
        req = new_request_id(shard_of(acct))
        t0 = asyncio.get_running_loop().time()
        charge = rng.randrange(1, 50_000)
        try:
            await self.ledger.reserve(acct, req, 60_000)
            await self.ledger.settle(acct, req, charge, metering=metering(req, "", out=charge))
        except Exception as exc:
            self.errors.append(type(exc).__name__)
            return
        self.settled[req] = charge
        self.done += 1
        self.slowest_s = max(self.slowest_s, asyncio.get_running_loop().time() - t0)

    async def run(self, stop: asyncio.Event, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            await self.pair(rng)


async def _under_load(
    ledger: Ledger, tmp_path: Path, disrupt: Any, *, workers: int = 24
) -> tuple[Load, Store]:
    accounts = []
    for i in range(24):
        acct, _ = await ledger.create_account(f"load{i}@example.com")
        await ledger.credit(acct, 100_000_000_000, reference=f"load{i}", source="grant")
        accounts.append(acct)
    assert len({ledger.redis.get_node_from_key(ledger.keys.pfx_for(a) + "j").name for a in accounts}) == 3
    store = Store(str(tmp_path / "g.sqlite3"))
    store.migrate()
    load = Load(ledger, accounts)
    stop, worker_stop = asyncio.Event(), asyncio.Event()
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    worker_task = asyncio.create_task(worker.run(worker_stop, interval_s=0.05))
    tasks = [asyncio.create_task(load.run(stop, seed)) for seed in range(workers)]
    while load.done < 300:
        await asyncio.sleep(0.02)
    before = load.done
    await asyncio.to_thread(disrupt)
    while load.done < before + 600:  # the load goes on through the failover and after it
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    worker_stop.set()
    await worker_task
    return load, store


async def _assert_conserved_and_metered_once(load: Load, store: Store) -> None:
    ledger = load.ledger
    # Every call was answered: the client waited for the replica's promotion instead of failing.
    assert load.errors == []
    assert await check_conservation(ledger) == []
    await drain_all(ledger, store)
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    rows = dict(store.query("SELECT request_id, charge_micro FROM metering"))
    # Exactly once: every acknowledged settle has its one row with its charge (the primary key
    # forbids a second), and no row exists for a request that was not settled.
    assert {r: rows.get(r) for r in load.settled} == load.settled
    assert set(rows) == set(load.settled)
    infos = [await ledger.account(a) for a in load.accounts]
    assert sum(i.consumed for i in infos if i is not None) == sum(rows.values())


def _busiest_primary(cluster: LocalCluster, ledger: Ledger) -> int:
    roles = cluster.roles()
    by_port: dict[int, int] = {}
    for s in ledger.keys.all_shards():
        node = ledger.redis.get_node_from_key(ledger.keys.journal(s))
        by_port[int(node.port)] = by_port.get(int(node.port), 0) + 1
    return max((p for p in by_port if roles.get(p) == "master"), key=lambda p: by_port[p])


@pytest.mark.slow
async def test_a_primary_killed_under_load_loses_no_money_and_meters_each_request_once(
    cluster_ledger: Ledger, redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    victim = _busiest_primary(redis_cluster, cluster_ledger)
    replica = redis_cluster.replica_of(victim)
    try:
        load, store = await _under_load(cluster_ledger, tmp_path, lambda: redis_cluster.kill(victim))
        assert redis_cluster.roles()[replica] == "master"  # promoted
        assert load.done >= 900
        if os.environ.get("CLUSTER_REPORT"):
            print(f"\nkill: pairs={load.done} errors={load.errors} slowest={load.slowest_s:.2f}s")
        await _assert_conserved_and_metered_once(load, store)
    finally:
        if victim not in redis_cluster.live():
            redis_cluster.restart(victim)  # back as a replica, for the rest of the session
        redis_cluster.wait_healthy()


@pytest.mark.slow
async def test_a_manual_failover_under_load_loses_no_money_and_meters_each_request_once(
    cluster_ledger: Ledger, redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    primary = _busiest_primary(redis_cluster, cluster_ledger)
    replica = redis_cluster.replica_of(primary)

    def failover() -> None:
        subprocess.run(["redis-cli", "-p", str(replica), "cluster", "failover"], check=True, timeout=10,
                       capture_output=True)

    try:
        load, store = await _under_load(cluster_ledger, tmp_path, failover)
        redis_cluster.wait_healthy()
        assert redis_cluster.roles()[replica] == "master"
        await _assert_conserved_and_metered_once(load, store)
    finally:
        redis_cluster.wait_healthy()



@pytest.mark.slow
async def test_the_gateway_serves_through_a_primary_killed_under_load_and_bills_each_request_once(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    """End to end: streaming requests on keys of every primary while one primary is SIGKILLed.
    Every request is answered 200 and billed exactly once; the books balance afterwards."""
    client = await connect(redis_cluster.url)
    keyspace = Keyspace(prefix=f"t{uuid.uuid4().hex[:10]}", shards=SHARDS)
    victim = 0
    try:
        async with FakeUpstream() as fake, running_gateway(
            client, keyspace, tmp_path, fake, key_concurrency_limit=100
        ) as gw:
            fake.script = Script(text_chunks=4, chunk_delay_s=0.01, usage=FakeUsage(input_cache_miss=20, output=50))
            keys = [await gw.funded_key(1000, email=f"gw{i}@example.com") for i in range(12)]
            victim = _busiest_primary(redis_cluster, gw.ledger)
            served: list[str] = []
            statuses: list[int] = []
            stop = asyncio.Event()

            async def client_loop(i: int) -> None:
                fmt = ("openai", "anthropic")[i % 2]
                while not stop.is_set():
                    key = keys[(i + len(statuses)) % len(keys)]
                    async with gw.http.post(
                        gw.url + path_for(fmt), json=body_for(fmt, "gpt-test", stream=True, max_tokens=100),
                        headers=headers_for(fmt, key),
                    ) as r:
                        raw = await r.read()
                        statuses.append(r.status)
                        if r.status == 200 and b"error" not in raw:
                            served.append(r.headers["x-request-id"])

            loops = [asyncio.create_task(client_loop(i)) for i in range(16)]
            while len(statuses) < 100:
                await asyncio.sleep(0.02)
            await asyncio.to_thread(redis_cluster.kill, victim)
            before = len(statuses)
            while len(statuses) < before + 200:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*loops)
            assert set(statuses) == {200} and len(served) == len(statuses)
            rows = await gw.settled(len(served))
            assert sorted(r["request_id"] for r in rows) == sorted(served)  # once each
            assert {r["status"] for r in rows} == {"ok"}
            assert await check_conservation(gw.ledger) == []
            await gw.reconcile_ok()
    finally:
        if victim and victim not in redis_cluster.live():
            redis_cluster.restart(victim)
        redis_cluster.wait_healthy()
        await delete_keys(client, [k async for k in scan_keys(client, f"{keyspace.prefix}:*")])
        await client.aclose()


async def test_ledger_writes_wait_for_a_replica_when_every_primary_has_one(redis_cluster: LocalCluster) -> None:
    # Redis replication is asynchronous: a settle acknowledged before its replica had it would be
    # lost with a primary killed right after. The client finds the replicas and the scripts WAIT.
    client = await connect(redis_cluster.url)
    try:
        assert isinstance(client, BoundedCluster) and client.wait_replicas == 1
        await client.set("{s00}:probe", "1")
        assert await client.wait_for_replica("{s00}:probe") == 1
    finally:
        await client.aclose()
