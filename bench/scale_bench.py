"""Several web processes on one Redis Cluster and one PostgreSQL: requests/s, latency, and the worker's
drain rate (issue 14), with the same load on one web process, a single Redis and SQLite as baseline.

    .venv/bin/python bench/scale_bench.py --quick     # ~1.5 minutes
    .venv/bin/python bench/scale_bench.py             # ~4 minutes
    .venv/bin/python bench/scale_bench.py --webs 1 2 4 --concurrency 64 --duration 20

Everything runs on loopback and is started here, in its own process group, and stopped at the end,
failure or not: a Redis Cluster of 3 primaries (ports 7301-7303, `--replicas 1` adds 7304-7306), a
single Redis (7310, restarted empty for each baseline) for the baselines (one web process with
SQLite, then with PostgreSQL), two PostgreSQL databases of its own on PG_URL (created, migrated with
`python -m ledger migrate`, dropped), the fake upstream (bench/_common.py), 4 web processes
(`python -m gateway serve`, web i with REDIS_URL at cluster node i mod nodes) and one worker (`python
-m gateway worker`). Accounts, grants and keys are made with the `python -m ledger` CLI.

Per configuration: a warm-up, then a bounded load (time and count) from this process, its connections
spread round-robin over the first N web processes; then the time until every answered request has its
metering row in the history (the lag). The worker's drain rate during the load is the metering rows
it wrote per second (one per request, two journal events each; its `ledger_journal_applied_total`
only moves when a pass ends, and under load a pass can last the whole phase). Last, its capacity:
the worker is stopped (SIGSTOP) during one more load per deployment, then resumed, and the backlog's
drain timed from its first committed row to its last (events from `ledger_journal_applied_total`).

Nothing is pinned: on a 2-core machine the load client, the fake upstream, N web processes, Redis,
PostgreSQL and the worker all share both cores (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psycopg
from _common import (
    CLK_TCK,
    ROOT,
    LoadResult,
    _connect,
    cpu_seconds,
    free_port,
    http_request,
    pct,
    raise_nofile,
    wait_port,
)

__all__ = ["main"]

PY = sys.executable
CLUSTER_BASE = 7301
SINGLE_PORT = 7310
MAX_WEBS = 4

MODELS_TOML = """
currency = "THB"

[providers.bench]
base_url = "http://127.0.0.1:{port}/v1"
format = "openai"
api_key_env = "BENCH_UPSTREAM_KEY"

[models."bench"]
provider = "bench"
upstream_model = "bench-upstream"
price_input_cache_hit = "1.5"
price_input_cache_miss = "3"
price_output = "12"
max_output_tokens = 4096
"""

BODY = json.dumps(
    {
        "model": "bench",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 512,
        "messages": [
            {"role": "system", "content": "You are a terse coding assistant."},
            {"role": "user", "content": "Write a function that adds two numbers, then explain it briefly."},
        ],
    }
).encode()


# ---- processes -----------------------------------------------------------------------------------


class Procs:
    """Every child in its own process group (start_new_session), stopped by group at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str] | None, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            p = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGCONT)  # a stopped worker cannot handle SIGTERM
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def _redis_args(port: int, d: Path, cluster: bool) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    args = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
        # The reference deployment's persistence (README "Scaling out"), on both sides of the comparison.
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory-policy", "noeviction", "--logfile", str(d / "log"),
    ]
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
    return args


def _cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def _wait(ok: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.1)


def start_cluster(procs: Procs, tmp: Path, replicas: int) -> list[int]:
    ports = [CLUSTER_BASE + i for i in range(3 * (1 + replicas))]
    for p in ports:
        procs.start(_redis_args(p, tmp / f"redis-{p}", cluster=True), None, tmp / f"redis-{p}.out")
    for p in ports:
        _wait(lambda p=p: _cli(p, "ping").strip() == "PONG", f"redis {p}")
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", str(replicas), "--cluster-yes"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    _wait(lambda: all("cluster_state:ok" in _cli(p, "cluster", "info") for p in ports), "the cluster", 60)
    return ports


def start_single(procs: Procs, tmp: Path, tag: str) -> subprocess.Popen[bytes]:
    p = procs.start(_redis_args(SINGLE_PORT, tmp / f"redis-{tag}", cluster=False), None, tmp / f"redis-{tag}.out")
    _wait(lambda: _cli(SINGLE_PORT, "ping").strip() == "PONG", "the single redis")
    return p


def host_busy_s() -> float:
    """CPU seconds spent by the whole machine (every core, every process) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK_TCK


def redis_cpu(ports: list[int]) -> float:
    total = 0.0
    for p in ports:
        info = dict(
            line.split(":", 1) for line in _cli(p, "info", "cpu").splitlines() if ":" in line
        )
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


# ---- the history ---------------------------------------------------------------------------------


def metering_rows(target: str) -> int:
    if target.startswith("postgresql://"):
        with psycopg.connect(target, autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM metering").fetchone()
            return int(row[0]) if row else 0
    c2 = sqlite3.connect(f"file:{target}?mode=ro", uri=True, timeout=5)
    try:
        return int(c2.execute("SELECT count(*) FROM metering").fetchone()[0])
    finally:
        c2.close()


def ledger_cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "-m", "ledger", "--json", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"python -m ledger {args[0]} failed: {out.stderr[-500:]}")
    return dict(json.loads(out.stdout))


# ---- one deployment ------------------------------------------------------------------------------


@dataclass
class Deployment:
    name: str
    redis_ports: list[int]
    history: str  # postgresql:// URL or SQLite path
    webs: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)
    worker: subprocess.Popen[bytes] | None = None
    worker_metrics: int = 0
    keys: list[str] = field(default_factory=list)
    answered: int = 0  # 200 streams so far, warm-ups included: the metering rows to wait for


def applied_total(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ledger_journal_applied_total "):
                return int(float(line.split()[1]))
    raise RuntimeError("no ledger_journal_applied_total")


def deploy(
    procs: Procs, tmp: Path, name: str, redis_ports: list[int], history: str, n_webs: int,
    fake_port: int, accounts: int,
) -> Deployment:
    d = tmp / name
    d.mkdir()
    models = d / "models.toml"
    models.write_text(MODELS_TOML.format(port=fake_port))
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env = {
        **base,
        "PYTHONPATH": str(ROOT),
        "SESSION_SECRET": secrets.token_hex(32),
        "MODELS_FILE": str(models),
        "DATABASE_PATH": str(d / "gateway.sqlite3"),
        "KEY_CONCURRENCY_LIMIT": "100000",
        "BENCH_UPSTREAM_KEY": "sk-bench",
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_GRACE_S": "5",
    }
    if history.startswith("postgresql://"):
        env["DATABASE_URL"] = history
    else:
        env["DATABASE_PATH"] = history
    dep = Deployment(name, redis_ports, history)
    cli_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{redis_ports[0]}/0"}
    ledger_cli(cli_env, "migrate")
    for i in range(accounts):
        # Each CLI call at another node (any node will do, SPEC 2).
        node = redis_ports[i % len(redis_ports)]
        e = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{node}/0"}
        acct = ledger_cli(e, "account", "create", f"bench-{i}@example.com")["account_id"]
        ledger_cli(e, "grant", acct, "10000000", "--reason", "bench")
        dep.keys.append(ledger_cli(e, "key", "create", acct)["key"])
    for i in range(n_webs):
        port = free_port()
        node = redis_ports[i % len(redis_ports)]
        web_env = {**env, "PORT": str(port), "REDIS_URL": f"redis://127.0.0.1:{node}/0"}
        dep.webs.append((port, procs.start([PY, "-m", "gateway", "serve"], web_env, d / f"web{i}.log")))
    dep.worker_metrics = free_port()
    worker_env = {**cli_env, "WORKER_METRICS_PORT": str(dep.worker_metrics)}
    dep.worker = procs.start([PY, "-m", "gateway", "worker"], worker_env, d / "worker.log")
    for port, _ in dep.webs:
        wait_port(port)
    wait_port(dep.worker_metrics)
    return dep


# ---- load ----------------------------------------------------------------------------------------


async def drive(dep: Deployment, n: int, conc: int, *, duration_s: float, max_requests: int) -> LoadResult:
    """`conc` keep-alive connections, connection i to web process i mod n with key i mod accounts."""
    webs = [port for port, _ in dep.webs[:n]]
    conns, requests = [], []
    for i in range(conc):
        port = webs[i % n]
        conns.append(await _connect(port))
        requests.append(
            http_request(
                port, "/v1/chat/completions", BODY,
                {"Content-Type": "application/json", "Authorization": f"Bearer {dep.keys[i % len(dep.keys)]}"},
            )
        )
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration_s
    budget = [max_requests]

    async def one(conn: Any, request: bytes) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                raw = await conn.send(request)
            except (RuntimeError, ConnectionError) as exc:
                result.errors += 1
                print(f"  error: {str(exc)[:120]}", file=sys.stderr)
                return
            t1 = time.perf_counter()
            if not raw.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in raw:
                result.errors += 1
                continue
            result.requests += 1
            result.ttfb_s.append(conn.first_body_at - t0)
            result.total_s.append(t1 - t0)

    await asyncio.gather(*(one(c, r) for c, r in zip(conns, requests, strict=True)))
    result.elapsed_s = time.perf_counter() - started
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    dep.answered += result.requests
    return result


async def wait_history(dep: Deployment, timeout: float) -> float:
    """Seconds until the history holds a metering row for every answered request."""
    t0 = time.perf_counter()
    while True:
        rows = await asyncio.to_thread(metering_rows, dep.history)
        if rows >= dep.answered:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{dep.name}: {rows} of {dep.answered} metering rows after {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def phase(dep: Deployment, n: int, a: argparse.Namespace) -> dict[str, Any]:
    await drive(dep, n, a.concurrency, duration_s=a.warmup, max_requests=a.concurrency * 20)
    await wait_history(dep, 120)
    assert dep.worker is not None
    pids = [p.pid for _, p in dep.webs[:n]]
    me = os.getpid()
    m0, h0 = metering_rows(dep.history), host_busy_s()
    w0, c0 = cpu_seconds(dep.worker.pid), cpu_seconds(me)
    s0, r0 = sum(cpu_seconds(p) for p in pids), redis_cpu(dep.redis_ports)
    res = await drive(dep, n, a.concurrency, duration_s=a.duration, max_requests=a.max_requests)
    w1, c1 = cpu_seconds(dep.worker.pid), cpu_seconds(me)
    s1, r1 = sum(cpu_seconds(p) for p in pids), redis_cpu(dep.redis_ports)
    m1, h1 = metering_rows(dep.history), host_busy_s()
    lag = await wait_history(dep, 300)
    el = res.elapsed_s
    row = {
        "config": dep.name, "webs": n, "conc": a.concurrency, "requests": res.requests, "errors": res.errors,
        "rps": res.rps, "p50_ms": pct(res.total_s, 50) * 1e3, "p99_ms": pct(res.total_s, 99) * 1e3,
        "ttfb50_ms": pct(res.ttfb_s, 50) * 1e3,
        "web_cores": (s1 - s0) / el, "web_cpu_ms_req": (s1 - s0) / max(res.requests, 1) * 1e3,
        "redis_cores": (r1 - r0) / el, "client_cores": (c1 - c0) / el, "host_cores": (h1 - h0) / el,
        # Metering rows the worker wrote during the load (one per request; two journal events each).
        "rows_ps": (m1 - m0) / el, "worker_cores": (w1 - w0) / el, "lag_s": lag,
    }
    print(
        f"  {dep.name} N={n}: {row['rps']:.0f} req/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
        f"{res.errors} errors; worker {row['rows_ps']:.0f} rows/s, lag {lag:.2f} s; "
        f"machine {row['host_cores']:.2f} cores busy",
        file=sys.stderr, flush=True,
    )
    return row


async def backlog(dep: Deployment, n: int, a: argparse.Namespace) -> dict[str, Any]:
    """The worker's capacity: a backlog made with the worker stopped, then drained and timed."""
    assert dep.worker is not None
    ap0 = applied_total(dep.worker_metrics)
    os.killpg(dep.worker.pid, signal.SIGSTOP)
    try:
        res = await drive(dep, n, a.concurrency, duration_s=a.duration, max_requests=a.backlog)
    finally:
        w0 = cpu_seconds(dep.worker.pid)
        os.killpg(dep.worker.pid, signal.SIGCONT)
    # From the first row the resumed worker commits (not from SIGCONT: it may have been stopped in
    # its half-second sleep between passes) to the last.
    before = metering_rows(dep.history)
    while metering_rows(dep.history) == before:
        await asyncio.sleep(0.01)
    wall = await wait_history(dep, 600)
    w1 = cpu_seconds(dep.worker.pid)
    # The counter is refreshed once a pass; the rows are all there, so the pass that wrote them ended.
    await asyncio.sleep(1.0)
    events = applied_total(dep.worker_metrics) - ap0
    row = {
        "config": dep.name, "requests": res.requests, "events": events, "drain_s": wall,
        "eps": events / wall, "rps": res.requests / wall, "worker_cores": (w1 - w0) / wall,
    }
    print(
        f"  {dep.name} backlog: {events} events ({res.requests} requests) drained in {wall:.2f} s = "
        f"{row['eps']:.0f} events/s = {row['rps']:.0f} requests/s, worker {row['worker_cores']:.0%} of a core",
        file=sys.stderr, flush=True,
    )
    return row


def print_table(rows: list[dict[str, Any]], backlogs: list[dict[str, Any]]) -> None:
    print(
        f"{'config':<22} {'N':>2} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'web cores':>9} "
        f"{'web ms/req':>10} {'redis cores':>11} {'client cores':>12} {'machine':>7} {'rows/s':>7} "
        f"{'worker cores':>12} {'lag s':>6}"
    )
    for r in rows:
        print(
            f"{r['config']:<22} {r['webs']:>2} {r['rps']:7.0f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
            f"{r['errors']:>4} {r['web_cores']:9.2f} {r['web_cpu_ms_req']:10.2f} {r['redis_cores']:11.2f} "
            f"{r['client_cores']:12.2f} {r['host_cores']:7.2f} {r['rows_ps']:7.0f} {r['worker_cores']:12.2f} "
            f"{r['lag_s']:6.2f}"
        )
    for b in backlogs:
        print(
            f"worker capacity ({b['config']}): {b['events']} events from {b['requests']} requests drained in "
            f"{b['drain_s']:.2f} s = {b['eps']:,.0f} events/s = {b['rps']:,.0f} requests/s "
            f"(worker at {b['worker_cores']:.0%} of a core)"
        )


# ---- main ----------------------------------------------------------------------------------------


async def run(a: argparse.Namespace, procs: Procs, tmp: Path, pg_urls: list[str]) -> None:
    fake_port = free_port()
    procs.start([PY, "bench/_common.py", "fake", str(fake_port), "0"], {**os.environ, "PYTHONPATH": str(ROOT)}, tmp / "fake.log")
    wait_port(fake_port)
    rows: list[dict[str, Any]] = []
    backlogs: list[dict[str, Any]] = []
    print(f"{os.cpu_count()} cores, nothing pinned; {a.concurrency} connections; {a.accounts} accounts", file=sys.stderr)

    # Baselines, one web process on a single Redis: with SQLite (the default deployment), and with
    # PostgreSQL (what the cluster alone costs, apart from the history's engine).
    for tag, history in (("sqlite", str(tmp / "history.sqlite3")), ("pg", pg_urls[1])):
        single = start_single(procs, tmp, tag)
        base = deploy(procs, tmp, f"single redis + {tag}", [SINGLE_PORT], history, 1, fake_port, a.accounts)
        rows.append(await phase(base, 1, a))
        if a.backlog:
            backlogs.append(await backlog(base, 1, a))
        for p in [p for _, p in base.webs] + [base.worker, single]:
            assert p is not None
            procs.stop(p)

    nodes = start_cluster(procs, tmp, a.replicas)
    name = f"cluster {len(nodes)} nodes + pg"
    dep = deploy(procs, tmp, "cluster", nodes, pg_urls[0], max(a.webs), fake_port, a.accounts)
    dep.name = name
    for n in a.webs:
        rows.append(await phase(dep, n, a))
    if a.backlog:
        backlogs.append(await backlog(dep, max(a.webs), a))
    print_table(rows, backlogs)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "backlogs": backlogs}, indent=1))


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases (~1.5 minutes in all)")
    p.add_argument("--webs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, default=32, help="connections in all, over the web processes")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--backlog", type=int, default=20_000, help="requests made with the worker stopped (0: skip)")
    p.add_argument("--accounts", type=int, default=3)
    p.add_argument("--replicas", type=int, choices=(0, 1), default=0)
    p.add_argument("--pg-url", default=os.environ.get("PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after the run")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.backlog = 8.0, 1.0, min(a.backlog, 6_000)
    if max(a.webs) > MAX_WEBS:
        p.error(f"at most {MAX_WEBS} web processes")
    if shutil.which("redis-server") is None:
        p.error("redis-server is needed")
    raise_nofile()
    # SIGTERM as SIGINT: the finally below stops every child and drops the database.
    signal.signal(signal.SIGTERM, _interrupted)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    run_id = uuid.uuid4().hex[:8]
    dbs = [f"cp_scale_{run_id}_cluster", f"cp_scale_{run_id}_single"]
    admin = a.pg_url
    created: list[str] = []
    try:
        with psycopg.connect(admin, autocommit=True) as c:
            for db in dbs:
                c.execute(f'CREATE DATABASE "{db}"'.encode())
                created.append(db)
        asyncio.run(run(a, procs, tmp, [f"{a.pg_url.rpartition('/')[0]}/{db}" for db in dbs]))
        return 0
    except Exception:
        for log in sorted(tmp.rglob("*.log")):
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            if tail:
                print(f"--- {log.relative_to(tmp)}", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        with psycopg.connect(admin, autocommit=True) as c:
            for db in created:
                c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'.encode())
        if a.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
