"""A real Redis Cluster on loopback for the tests: three primaries, one replica each, in a temp dir.

Started once per test session (tests/conftest.py's `redis_cluster`), only when a test asks for it.
`cluster-node-timeout` is 1 s so a killed primary's replica takes over in about two seconds.
Ports: REDIS_CLUSTER_PORT (the first of six consecutive ports) when set, else free ones found here
(each with its cluster-bus port, +10000, free too).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalCluster"]

NODES = 6
REPLICAS = 1


def _free(port: int) -> bool:
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _ports() -> list[int]:
    base = os.environ.get("REDIS_CLUSTER_PORT")
    if base:
        return list(range(int(base), int(base) + NODES))
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(20000, 40000 - NODES)
        ports = list(range(start, start + NODES))
        if all(_free(p) for p in ports):
            return ports
    raise RuntimeError("no six free loopback ports for a test Redis Cluster")


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout


@dataclass
class LocalCluster:
    root: Path
    ports: list[int] = field(default_factory=_ports)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Any node will do (SPEC 2): the last one, a replica at start, to prove it."""
        return f"redis://127.0.0.1:{self.ports[-1]}/0"

    def start(self) -> LocalCluster:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed (scripts/test installs them)")
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait(lambda p=port: _cli(p, "ping").strip() == "PONG")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(REPLICAS), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        self.wait_healthy()
        return self

    def _spawn(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                "--save", "", "--appendonly", "no", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0", "--logfile", str(d / "log"),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    @staticmethod
    def _wait(ok: object, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():  # type: ignore[operator]
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis Cluster did not come up")
            time.sleep(0.1)

    def live(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def roles(self) -> dict[int, str]:
        """port -> 'master' or 'slave', for every live node."""
        out = {}
        for p in self.live():
            info = _cli(p, "info", "replication")
            out[p] = "master" if "role:master" in info else "slave"
        return out

    def replica_of(self, primary: int) -> int:
        """A live replica of `primary` (by port)."""
        for p, role in self.roles().items():
            if role == "slave" and f"master_port:{primary}" in _cli(p, "info", "replication"):
                return p
        raise RuntimeError(f"no replica of {primary}")

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node says cluster_state:ok and every replica's link to its primary is up."""

        def ok() -> bool:
            for p in self.live():
                if "cluster_state:ok" not in _cli(p, "cluster", "info"):
                    return False
                info = _cli(p, "info", "replication")
                if "role:slave" in info and "master_link_status:up" not in info:
                    return False
            masters = [p for p, r in self.roles().items() if r == "master"]
            return len(masters) == NODES // (REPLICAS + 1)

        self._wait(ok, timeout)

    def kill(self, port: int) -> None:
        """SIGKILL a node: no goodbye, as a crashed host."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Bring a killed node back: it rejoins (from its nodes.conf) as a replica of its replacement."""
        self._spawn(port)
        self._wait(lambda: _cli(port, "ping").strip() == "PONG")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
