"""Closing an account forgets its email and Google sub for real: in no byte of any SQLite file
(database, -wal, -shm), in no page of PostgreSQL's accounts table, and in no Redis value, the
journal streams included (privacy policy 3, 4, 8)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ledger.journal import JournalWorker
from ledger.keys import Keyspace
from ledger.ledger import Ledger
from ledger.personal import open_sealed
from ledger.rebuild import rebuild
from ledger.reconcile import drain_all, reconcile
from ledger.store import Store
from tests.fakes.oidc import FakeUser
from tests.history import history_target
from tests.web_harness import redis_dump, running_web


def file_bytes(db: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name)}


async def stream_values(redis: aioredis.Redis, keyspace: Keyspace) -> list[str]:
    out: list[str] = []
    for shard in keyspace.all_shards():
        for _, fields in await redis.xrange(keyspace.journal(shard)):
            out += [f"{k}={v}" for k, v in fields.items()]
    return out


@pytest.mark.sqlite_only
async def test_closure_leaves_email_and_sub_in_no_file_byte_and_no_redis_value(
    redis_client: aioredis.Redis, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    email, sub = f"forget-{uuid.uuid4().hex[:12]}@example.com", f"sub-{uuid.uuid4().hex}"
    async with running_web(redis_client, clean_keyspace, tmp_path, user=FakeUser(sub=sub, email=email)) as w:
        # Neighbours on the same database page: the closed row's old bytes would stay in the page's
        # free space (not only at its end) unless erased.
        for i in range(4):
            await w.ledger.create_account(f"before-{i}@example.com", sub=f"neighbour-before-{i}")
        b = w.browser()
        await w.sign_in(b)
        acct = (await b.get("/api/account")).json()["account_id"]
        for i in range(4):
            await w.ledger.create_account(f"after-{i}@example.com", sub=f"neighbour-after-{i}")
        # The journal carries them sealed only, from the start (it is not trimmed until drained).
        journal = await stream_values(redis_client, clean_keyspace)
        assert any(v.startswith("email_sealed=") for v in journal)
        assert not [v for v in journal if email in v or sub in v]
        await w.drain()
        db = w.settings.database_path
        # The check can see them: before closing they are in the history file's bytes.
        assert any(email.encode() in data for data in file_bytes(db).values())
        rows = await asyncio.to_thread(
            w.store.query, "SELECT email, google_sub FROM accounts WHERE account_id = ?", (acct,)
        )
        assert tuple(rows[0]) == (email, sub)
        # Events still in the stream at closure time: settle one request's worth of history.
        await w.ledger.credit(acct, 1_000_000, reference="t1", source="grant")
        await w.ledger.set_email(acct, "renamed-" + email)

        r = await b.post("/api/account/close", json={"confirm": True}, headers={"X-CSRF-Token": await w.csrf(b)})
        assert r.status == 200, r.text
        # Redis, before the worker ran: no value holds them, and what the stream still holds sealed
        # cannot be opened any more (the account's key went with the closure).
        values = await redis_dump(redis_client, clean_keyspace.prefix)
        assert not [v for v in values if email in v or sub in v]
        pfx = clean_keyspace.pfx_for(acct)
        assert await redis_client.hget(pfx + "a:" + acct, "pii_key") is None
        sealed = [v.partition("=")[2] for v in await stream_values(redis_client, clean_keyspace) if v.startswith("sealed=")]
        assert sealed and all(open_sealed(None, acct, "email", s) is None for s in sealed)

        await w.drain()
        files = file_bytes(db)
        assert {db.name, db.name + "-wal", db.name + "-shm"} <= set(files)
        for name, data in files.items():
            for secret in (email, sub):
                assert secret.encode() not in data, (name, secret)
        assert files[db.name + "-wal"] == b""  # checkpointed and truncated after the erasure
        rows = await asyncio.to_thread(
            w.store.query, "SELECT email, google_sub, status FROM accounts WHERE account_id = ?", (acct,)
        )
        assert tuple(rows[0]) == (None, None, "closed")
        assert not [v for v in await redis_dump(redis_client, clean_keyspace.prefix) if email in v or sub in v]
        assert (await reconcile(w.ledger, w.store)).ok


async def test_a_rebuilt_ledger_still_restores_and_records_email_and_sub(
    ledger: Ledger, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    store = Store(history_target(tmp_path))
    store.migrate()
    try:
        acct, _ = await ledger.create_account("before@example.com", sub="sub-rebuilt-1")
        await drain_all(ledger, store)
        await rebuild(ledger, store, force=True)
        # Restored from SQLite: the sub index and the email; a fresh key seals what comes next.
        assert await ledger.find_account_by_sub("sub-rebuilt-1") == acct
        info = await ledger.account(acct)
        assert info is not None and info.email == "before@example.com"
        await ledger.set_email(acct, "after@example.com")
        assert not [v for v in await stream_values(ledger.redis, clean_keyspace) if "after@example.com" in v]
        await drain_all(ledger, store)
        row = store.query("SELECT email, google_sub FROM accounts WHERE account_id = ?", (acct,))[0]
        assert tuple(row) == ("after@example.com", "sub-rebuilt-1")
        # Created, renamed and closed before the worker ever ran: nothing personal lands in SQLite.
        gone, _ = await ledger.create_account("gone@example.com", sub="sub-gone-1")
        await ledger.set_email(gone, "gone2@example.com")
        await ledger.close_account(gone)
        await drain_all(ledger, store)
        row = store.query("SELECT email, google_sub, status FROM accounts WHERE account_id = ?", (gone,))[0]
        assert tuple(row) == (None, None, "closed")
        assert (await reconcile(ledger, store)).ok
    finally:
        store.close()


@pytest.mark.sqlite_only
async def test_the_erased_row_leaves_no_bytes_in_its_page(
    ledger: Ledger, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    """One closed account among its neighbours on a page: its old cell is zeroed (secure_delete),
    not left in the page's free space, and the WAL that held it is emptied."""
    db = tmp_path / "gateway.sqlite3"
    store = Store(str(db))
    store.migrate()
    try:
        # Long values: an update that shrinks a row reuses only the end of its old cell, so without
        # secure_delete the start of a long email would stay in the freed space.
        accounts = [
            (await ledger.create_account(f"person-{i:02d}-{'x' * 60}@example.com", sub=f"google-sub-{i:02d}"))[0]
            for i in range(20)
        ]
        await drain_all(ledger, store)
        await ledger.close_account(accounts[7])
        await drain_all(ledger, store)
        data = b"".join(file_bytes(db).values())
        assert b"person-06-" in data and b"google-sub-08" in data  # the neighbours stay
        assert b"person-07-" not in data and b"google-sub-07" not in data
    finally:
        store.close()


@pytest.mark.sqlite_only
async def test_a_reader_that_blocks_the_checkpoint_only_delays_it(
    ledger: Ledger, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    db = tmp_path / "gateway.sqlite3"
    store = Store(str(db))
    store.migrate()
    worker = JournalWorker(ledger.redis, ledger.keys, store, ledger=ledger)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        acct, _ = await ledger.create_account("held@example.com", sub="sub-held-1")
        await worker.drain_once()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM accounts").fetchone()  # a snapshot, as Litestream holds
        await ledger.close_account(acct)
        await worker.drain_once()
        assert b"held@example.com" in (db.parent / (db.name + "-wal")).read_bytes()
        reader.execute("COMMIT")
        worker._erase_retry_at = 0.0  # instead of waiting ERASE_RETRY_S
        await worker.drain_once()
        assert all(b"held@example.com" not in data for data in file_bytes(db).values())
    finally:
        reader.close()
        store.close()


def heap_bytes(store: Store, table: str) -> bytes:
    """Every page of the table's heap file as PostgreSQL holds it (pageinspect, a superuser's tool)."""
    store.write(lambda conn: conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA public"))
    blocks = store.query(f"SELECT pg_relation_size('{table}') / 8192")[0][0]
    return b"".join(
        bytes(store.query(f"SELECT public.get_raw_page('{table}', {n})")[0][0]) for n in range(blocks)
    )


@pytest.mark.postgres_only
async def test_postgres_closure_rewrites_accounts_without_the_old_row_version(
    ledger: Ledger, clean_keyspace: Keyspace, tmp_path: Path
) -> None:
    """The erasing UPDATE leaves the old version dead in its page; after the worker's VACUUM FULL
    no page of the table holds it, while the neighbours stay."""
    store = Store(history_target(tmp_path))
    store.migrate()
    try:
        accounts = [
            (await ledger.create_account(f"pg-person-{i:02d}@example.com", sub=f"pg-sub-{i:02d}"))[0]
            for i in range(20)
        ]
        await drain_all(ledger, store)
        assert b"pg-person-07" in heap_bytes(store, "accounts")
        await ledger.close_account(accounts[7])
        await drain_all(ledger, store)  # applies the closure, then forget_erased
        data = heap_bytes(store, "accounts")
        assert b"pg-person-06" in data and b"pg-sub-08" in data
        assert b"pg-person-07" not in data and b"pg-sub-07" not in data
        row = store.query("SELECT email, google_sub, status FROM accounts WHERE account_id = ?", (accounts[7],))
        assert tuple(row[0]) == (None, None, "closed")
        assert (await reconcile(ledger, store)).ok
    finally:
        store.close()
