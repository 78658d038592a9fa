"""Settlements that could not reach the ledger, kept on local disk until they can.

One spool per web process, in a directory beside the SQLite file (``spool/``):

    <id>.lock       flock'ed by its process for its whole life: a lock anyone else can take means
                    the process is dead, and its files are theirs to finish
    <id>.jsonl      settlements Redis did not take (down, restarting, lost): one JSON line each,
                    fsync'd before the request lets go of it
    <id>.live.json  the process's live streams and what each has produced so far, rewritten every
                    few seconds (no fsync: it is for a process killed with -9, not a host that died)

The owner replays its own settlements as soon as Redis answers again. A dead owner's files are
finished by whoever locks them first (the worker, or any web process): its spooled settlements are
replayed, then each live stream of its last snapshot is settled with what it had produced (status
``interrupted``), which also gives its hold back. Replays are idempotent on the request id: a
settlement that did reach Redis answers "exists" the second time.

Records hold ids, token counts and amounts only, never content (ADR-0005).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from .errors import LedgerLost
from .ledger import Ledger

__all__ = ["Spool", "Spooled", "recover_orphans", "spool_dir"]

log = logging.getLogger("ledger.spool")

# What stops a replay for now (retried later); anything else is a bug in a record, logged and kept.
_UNAVAILABLE = (LedgerLost, RedisError, OSError)


def spool_dir(database_path: str | Path) -> Path:
    return Path(database_path).resolve().parent / "spool"


@dataclass(frozen=True, slots=True)
class Spooled:
    """One settlement waiting for the ledger: what `Ledger.settle` takes."""

    account_id: str
    request_id: str
    charge_micro: int
    metering: dict[str, Any]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "account_id": self.account_id,
                "request_id": self.request_id,
                "charge_micro": self.charge_micro,
                "metering": self.metering,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Spooled | None:
        try:
            obj = orjson.loads(raw)
            return cls(str(obj["account_id"]), str(obj["request_id"]), int(obj["charge_micro"]), dict(obj["metering"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # a line cut short by a crash mid-write


async def _settle(ledger: Ledger, s: Spooled) -> None:
    await ledger.settle(s.account_id, s.request_id, s.charge_micro, metering=s.metering)


def _read_lines(path: Path) -> list[Spooled]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out: dict[str, Spooled] = {}
    for line in raw.splitlines():
        s = Spooled.from_json(line)
        if s is not None:
            out.setdefault(s.request_id, s)  # the first one written is the one that counts
    return list(out.values())


def _read_live(path: Path) -> list[Spooled]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        s = Spooled.from_json(orjson.dumps(item))
        if s is not None:
            out.append(s)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path, ident: str | None = None) -> None:
        self.directory = directory
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
        self.ident = ident or f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
        self.pending: dict[str, Spooled] = {}
        self._lock_fd: int | None = None
        self._file: Any = None  # the append handle of <id>.jsonl, opened on the first record

    @property
    def path(self) -> Path:
        return self.directory / f"{self.ident}.jsonl"

    @property
    def live_path(self) -> Path:
        return self.directory / f"{self.ident}.live.json"

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{self.ident}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd

    def add(self, s: Spooled) -> None:
        """Durable before it returns: appended and fsync'd."""
        if self._file is None:
            new = not self.path.exists()
            self._file = open(self.path, "ab")  # kept open: one fsync per record, no reopen
            if new:
                _fsync_dir(self.directory)
        self._file.write(s.to_json() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.pending.setdefault(s.request_id, s)

    def write_live(self, items: Iterable[Spooled]) -> None:
        """The live streams' progress, replaced whole (rename is atomic): a reader sees one snapshot."""
        data = [orjson.loads(s.to_json()) for s in items]
        if not data:
            with contextlib.suppress(FileNotFoundError):
                self.live_path.unlink()
            return
        tmp = self.live_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, self.live_path)

    async def replay(self, ledger: Ledger) -> int:
        """Settle what is pending, oldest first; stops at the first sign the ledger is still away.
        Returns how many were settled now."""
        done = 0
        for req, s in list(self.pending.items()):
            try:
                await _settle(ledger, s)
            except _UNAVAILABLE:
                break
            del self.pending[req]
            done += 1
        if done:
            self._rewrite()
        return done

    def _rewrite(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.pending:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for s in self.pending.values():
                f.write(s.to_json() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)

    def close(self) -> None:
        """At exit: what is still pending stays on disk (the next owner of the lock replays it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.live_path.unlink()
        if self._lock_fd is not None:
            if not self.pending:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{self.ident}.lock").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None


async def recover_orphans(directory: Path, ledger: Ledger, *, skip: str = "") -> tuple[int, int]:
    """Finish the spools of dead processes (those whose lock can be taken). Returns (settlements
    replayed, interrupted streams settled). A spool whose replay stops early is left for next time."""
    replayed = interrupted = 0
    try:
        locks = sorted(directory.glob("*.lock"))
    except OSError:
        return 0, 0
    for lock in locks:
        ident = lock.name.removesuffix(".lock")
        if ident == skip:
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue  # finished by someone else meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            spooled = _read_lines(directory / f"{ident}.jsonl")
            live = _read_live(directory / f"{ident}.live.json")
            complete = True
            for group, is_live in ((spooled, False), (live, True)):
                for s in group:
                    try:
                        await _settle(ledger, s)
                    except _UNAVAILABLE:
                        complete = False
                        break
                    if is_live:
                        interrupted += 1
                    else:
                        replayed += 1
                if not complete:
                    break
            if complete:
                for suffix in (".jsonl", ".live.json", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        (directory / f"{ident}{suffix}").unlink()
                if spooled or live:
                    log.info(
                        "finished the spool of a stopped process spool=%s settlements=%d interrupted=%d",
                        ident, len(spooled), len(live),
                    )
        finally:
            os.close(fd)
    return replayed, interrupted
