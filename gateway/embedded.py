"""The embedded default: an in-process Redis (fakeredis with Lua) reachable on a loopback port.

The port lets ``python -m ledger`` (and redis-cli) reach the same ledger while the gateway runs; its
URL is written next to the SQLite file. Not for production: it keeps nothing when the process stops
except what the journal already copied into SQLite, which start-up restores.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from fakeredis import TcpFakeServer
from fakeredis._clients._tcp_server import TCPFakeRequestHandler

from ledger.ledger import Ledger
from ledger.store import Store

__all__ = ["EmbeddedRedis", "bootstrap_demo"]

log = logging.getLogger("gateway.embedded")


_COMMAND_LOCK = threading.Lock()


class _SerialHandler(TCPFakeRequestHandler):
    """fakeredis serves each connection in its own thread but its state (and the Lua runtime) is not
    thread-safe: run one command at a time, as a real Redis does."""

    def setup(self) -> None:
        super().setup()
        sock = self.current_client.get_socket()
        unlocked = sock.sendall

        def sendall(data: bytes) -> None:
            with _COMMAND_LOCK:
                unlocked(data)

        sock.sendall = sendall  # type: ignore[method-assign,assignment]


class EmbeddedRedis:
    def __init__(self, url_file: Path) -> None:
        self.url_file = url_file
        self._server: TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"redis://{host!s}:{port}/0"

    def start(self) -> str:
        self._server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
        self._server.daemon_threads = True
        self._server.RequestHandlerClass = _SerialHandler
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-redis", daemon=True)
        self._thread.start()
        self.url_file.parent.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(self.url + "\n")
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        try:
            self.url_file.unlink()
        except FileNotFoundError:
            pass


DEMO_EMAIL = "demo@localhost"
DEMO_GRANT_MICRO = 100_000_000  # 100 currency units of play money


async def bootstrap_demo(ledger: Ledger, store: Store) -> tuple[str, str]:
    """Restore the ledger from SQLite if this is a fresh in-process Redis, then make sure a demo
    account with play credit exists and give it a fresh key (keys are only ever shown once).
    Returns (account_id, api_key)."""
    from ledger.epoch import LedgerState, history_in, open_ledger
    from ledger.rebuild import rebuild

    if await open_ledger(ledger, history_in(store)) is LedgerState.LOST:
        restored = await rebuild(ledger, store)
        log.info("embedded ledger restored from SQLite accounts=%d buckets=%d", restored.accounts, restored.buckets)
    rows = await asyncio.to_thread(
        store.query, "SELECT account_id FROM accounts WHERE email = ? AND status = 'active'", (DEMO_EMAIL,)
    )
    account_id = rows[0]["account_id"] if rows else None
    if account_id is None or await ledger.account(account_id) is None:
        account_id, _ = await ledger.create_account(DEMO_EMAIL)
    await ledger.credit(account_id, DEMO_GRANT_MICRO, reference=f"demo-grant:{account_id}", source="grant")
    keys = await ledger.list_keys(account_id)
    if len(keys) >= 2:
        new = await ledger.rotate_key(keys[0].key_id)
    else:
        new = await ledger.create_key(account_id)
    return account_id, new.key
