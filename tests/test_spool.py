"""The settlement spool: durable on disk, replayed once and only once, finished by others when its
process dies (spooled settlements first, then the live streams' progress notes)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from ledger.errors import LedgerLost
from ledger.ledger import Ledger
from ledger.reconcile import reconcile
from ledger.spool import Spool, Spooled, recover_orphans
from ledger.store import Store
from tests.test_journal import THB, metering


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(str(tmp_path / "gateway.sqlite3"))
    s.migrate()
    yield s
    s.close()


async def funded(ledger: Ledger, n_holds: int) -> tuple[str, list[str]]:
    acct, _ = await ledger.create_account("spool@example.com")
    await ledger.credit(acct, 10 * THB, reference="spool_1", source="grant")
    reqs = [f"req_00{i:08d}" for i in range(n_holds)]
    for req in reqs:
        await ledger.reserve(acct, req, THB)
    return acct, reqs


def bill(acct: str, req: str, charge: int, status: str = "ok") -> Spooled:
    return Spooled(acct, req, charge, {**metering(req, ""), "status": status})


async def hide_epoch(ledger: Ledger) -> list[str]:
    marks = [await ledger.redis.get(ledger.keys.epoch(s)) for s in ledger.keys.all_shards()]
    await ledger.redis.delete(*(ledger.keys.epoch(s) for s in ledger.keys.all_shards()))
    return marks


async def restore_epoch(ledger: Ledger, marks: list[str]) -> None:
    for s, m in zip(ledger.keys.all_shards(), marks, strict=True):
        await ledger.redis.set(ledger.keys.epoch(s), m)


async def test_a_spooled_settlement_is_on_disk_and_replayed_exactly_once(
    ledger: Ledger, store: Store, tmp_path: Path
) -> None:
    acct, (req,) = await funded(ledger, 1)
    spool = Spool(tmp_path / "spool")
    spool.open()
    spool.add(bill(acct, req, 300_000))
    spool.add(bill(acct, req, 999_999))  # the same request again: the first record counts
    lines = spool.path.read_bytes().splitlines()
    assert [orjson.loads(x)["request_id"] for x in lines] == [req, req]
    assert b"content" not in spool.path.read_bytes()  # ids, counts and amounts only
    marks = await hide_epoch(ledger)  # the ledger is away (being restored)
    assert await spool.replay(ledger) == 0
    assert list(spool.pending) == [req]
    await restore_epoch(ledger, marks)
    assert await spool.replay(ledger) == 1
    assert spool.pending == {} and not spool.path.exists()
    info = await ledger.account(acct)
    assert info is not None and (info.consumed, info.reserved) == (300_000, 0)
    spool.close()
    assert list((tmp_path / "spool").iterdir()) == []
    report = await reconcile(ledger, store)
    assert report.ok, report.problems


async def test_the_spool_of_a_dead_process_is_finished_by_whoever_locks_it(
    ledger: Ledger, store: Store, tmp_path: Path
) -> None:
    acct, (spooled_req, live_req, finished_req) = await funded(ledger, 3)
    directory = tmp_path / "spool"
    owner = Spool(directory)
    owner.open()
    owner.add(bill(acct, spooled_req, 200_000))
    # A stream that finished and settled after the last progress note: the note must not bill it again.
    await ledger.settle(acct, finished_req, 500_000, metering=metering(finished_req, ""))
    owner.write_live(
        [bill(acct, live_req, 120_000, "interrupted"), bill(acct, finished_req, 50_000, "interrupted")]
    )
    # While its process lives, nobody else touches the spool.
    assert await recover_orphans(directory, ledger) == (0, 0)
    assert (await ledger.account(acct)).reserved == 2 * THB  # type: ignore[union-attr]
    # kill -9: the lock goes with the process, the files stay.
    assert owner._lock_fd is not None
    os.close(owner._lock_fd)
    owner._lock_fd = None
    marks = await hide_epoch(ledger)
    assert await recover_orphans(directory, ledger) == (0, 0)  # the ledger is away: kept for later
    assert owner.path.exists() and owner.live_path.exists()
    await restore_epoch(ledger, marks)
    assert await recover_orphans(directory, ledger) == (1, 2)
    assert list(directory.iterdir()) == []
    info = await ledger.account(acct)
    assert info is not None and (info.consumed, info.reserved) == (200_000 + 120_000 + 500_000, 0)
    report = await reconcile(ledger, store)
    assert report.ok, report.problems
    statuses = dict(store.query("SELECT request_id, status FROM metering"))
    assert statuses == {spooled_req: "ok", live_req: "interrupted", finished_req: "ok"}


async def test_settle_refused_by_a_lost_ledger_raises_ledger_lost(ledger: Ledger) -> None:
    acct, (req,) = await funded(ledger, 1)
    await hide_epoch(ledger)
    with pytest.raises(LedgerLost):
        await ledger.settle(acct, req, 1, metering=metering(req, ""))


async def test_live_streams_are_noted_as_they_go_and_counted_piece_by_piece(
    redis_client, clean_keyspace, tmp_path: Path
) -> None:
    from gateway import tokens
    from gateway.appkeys import PROXY
    from tests.fakes.upstream import FakeUpstream, Script
    from tests.gateway_harness import running_gateway

    text = "alpha beta gamma delta " * 30
    async with FakeUpstream(Script(text=text, text_chunks=60, chunk_delay_s=0.05, usage=None)) as fake:
        async with running_gateway(redis_client, clean_keyspace, tmp_path, fake, progress_every_s=0.2) as gw:
            key = await gw.funded_key(10)
            spool = gw.app[PROXY].spool
            assert spool is not None
            body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            seen: list[int] = []
            async with gw.http.post(
                gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                request_id = r.headers["x-request-id"]
                while not r.content.at_eof():
                    await r.content.readany()
                    if spool.live_path.exists():
                        notes = orjson.loads(spool.live_path.read_bytes())
                        if notes:
                            assert [n["request_id"] for n in notes] == [request_id]
                            assert notes[0]["metering"]["status"] == "interrupted"
                            seen.append(notes[0]["metering"]["output_tokens"])
            assert seen and seen == sorted(seen) and 0 < seen[-1] <= tokens.count_text(text)
            rows = await gw.settled(1)
            assert rows[0]["status"] == "ok" and rows[0]["output_tokens"] >= seen[-1]
            for _ in range(50):  # the next note no longer lists the finished stream
                if not spool.live_path.exists():
                    break
                await asyncio.sleep(0.05)
            assert not spool.live_path.exists()
