"""The operator's edges: the embedded default stays on this machine, a missing webhook secret is
said loudly at start-up."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gateway.__main__ import startup_warnings
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_embedded_default_binds_loopback_whatever_host_says() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.com"):
        s = Settings.from_env({"HOST": host})
        assert (s.host, s.requested_host) == ("127.0.0.1", host)
        assert s.public_base_url.startswith("http://127.0.0.1:")
        assert any(f"HOST={host} ignored" in w for w in startup_warnings(s))
    for host in ("127.0.0.1", "localhost", "::1"):
        s = Settings.from_env({"HOST": host})
        assert (s.host, s.requested_host) == (host, None) and startup_warnings(s) == []
    real = Settings.from_env({"HOST": "0.0.0.0", "REDIS_URL": "redis://r:6379/0", "SESSION_SECRET": "x" * 32})
    assert (real.host, real.requested_host) == ("0.0.0.0", None)
    omise = {"REDIS_URL": "redis://r:6379/0", "SESSION_SECRET": "x" * 32, "OMISE_SECRET_KEY": "skey_test_1",
             "OMISE_PUBLIC_KEY": "pkey_test_1"}
    assert any("OMISE_WEBHOOK_SECRET is not set" in w for w in startup_warnings(Settings.from_env(omise)))
    assert startup_warnings(Settings.from_env({**omise, "OMISE_WEBHOOK_SECRET": "c2VjcmV0"})) == []


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


def _post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=b"csrf_token=x", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_procfile_web_without_redis_url_serves_loopback_only_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OMISE_", "GOOGLE_", "SESSION_"))}
    env.update(
        HOST="0.0.0.0",  # as the Procfile's web line sets it
        PORT="0",
        DATABASE_PATH=str(tmp_path / "gateway.sqlite3"),
        OMISE_SECRET_KEY="skey_test_edges",
        OMISE_PUBLIC_KEY="pkey_test_edges",
        OMISE_API_BASE="http://127.0.0.1:9",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "Listening on" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve exited"
        m = re.search(r"Listening on http://([\d.]+):(\d+)", line)
        assert m is not None and m.group(1) == "127.0.0.1", line
        port = int(m.group(2))
        base = f"http://127.0.0.1:{port}"
        # Not reachable from another interface of this machine (when it has one).
        other = _non_loopback_address()
        if other is not None:
            with socket.socket() as s:
                assert s.connect_ex((other, port)) != 0
        # Demo sign-in: a request forwarded by a proxy on this machine is someone else's.
        status, page = _post(base + "/auth/demo", {"X-Forwarded-For": "203.0.113.5"})
        assert status == 403 and "only from this machine" in page
        status, page = _post(base + "/auth/demo", {})
        assert "only from this machine" not in page  # loopback gets as far as the CSRF check
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "HOST=0.0.0.0 ignored" in err and "listens on 127.0.0.1 only" in err
    assert "OMISE_WEBHOOK_SECRET is not set" in err


def test_log_lines_keep_the_standard_time_stamp() -> None:
    # gateway.__main__._Formatter makes the date part once a second; the line is the standard one.
    import logging

    from gateway.__main__ import _Formatter

    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    ours, standard = _Formatter(fmt), logging.Formatter(fmt)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25, 1_800_000_000.0):
        record = logging.LogRecord("gateway.proxy", logging.INFO, __file__, 1, "settled n=%d", (3,), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)


def test_the_web_process_keeps_its_start_up_objects_out_of_the_collectors_passes() -> None:
    # Run in a child: freezing is process-wide and would change the collector for the other tests.
    code = (
        "import gc; from gateway.__main__ import _tune_gc; before = gc.get_freeze_count(); _tune_gc(); "
        "print(before, gc.get_freeze_count() > 10_000, gc.get_threshold())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(maxsplit=1) == ["0", "True (10000, 10, 10)\n"]


def test_info_lines_are_written_together_soon_and_warnings_at_once_after_them() -> None:
    # The web process's stderr: info lines gathered on the loop for at most FLUSH_S, then one
    # write; a warning flushes what came before it, in order; at exit nothing is left behind.
    code = """
import asyncio, logging, os, sys, time
from gateway.__main__ import _GatheredLines, _logging
_logging("INFO")
log = logging.getLogger("gateway.test")
def mark(s): os.write(2, s.encode())  # straight to the fd, past any gathering
async def main():
    log.info("one")
    log.info("two")
    mark("|gathered|\\n")
    await asyncio.sleep(_GatheredLines.FLUSH_S * 3)
    mark("|slept|\\n")
    log.info("three")
    log.warning("four")
    mark("|warned|\\n")
    log.info("five")
    await asyncio.to_thread(log.info, "from a thread")  # another thread: written at once, after five
    mark("|thread|\\n")
asyncio.run(main())
log.info("six")  # no loop running now: written at once
mark("|after loop|\\n")
log.info("seven")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    order = [ln.split(" ", 4)[-1] if " gateway.test " in ln else ln for ln in p.stderr.splitlines()]
    assert order == [
        "|gathered|", "one", "two", "|slept|", "three", "four", "|warned|", "five", "from a thread", "|thread|",
        "six", "|after loop|", "seven",
    ], p.stderr
