"""Keeping settlements safe in a web process: the spool's replay, progress notes of live streams,
the spools of dead processes, and the shutdown budget.

Every second: replay this process's spool once Redis answers again. Every PROGRESS_EVERY_S: write
what each live stream has produced so far (the note a process killed with -9 leaves; whoever finds
its spool settles those streams from it). Every ORPHANS_EVERY_S: finish the spools of dead processes.
"""

from __future__ import annotations

import asyncio
import logging

from ledger.ledger import Ledger
from ledger.spool import Spool, recover_orphans

from .exchange import Counted, progress_note
from .metrics import Metrics
from .proxy import Proxy

__all__ = ["ORPHANS_EVERY_S", "keep_settlements", "shutdown_budget"]

log = logging.getLogger("gateway.durability")

ORPHANS_EVERY_S = 5.0


def shutdown_budget(grace_s: float) -> tuple[float, float]:
    """How SHUTDOWN_GRACE_S is spent, all of it counted from SIGTERM: streams run until
    grace - margin; then they are cut (each handler gets `handler_s` to finish, twice: aiohttp waits,
    cancels, waits again) and settled; what has not settled by the end is spooled to disk.
    Returns (margin, handler_s)."""
    margin = min(5.0, max(0.5, grace_s * 0.2))
    return margin, margin / 4


async def keep_settlements(
    proxy: Proxy, ledger: Ledger, spool: Spool, metrics: Metrics, *, progress_every_s: float
) -> None:
    loop = asyncio.get_running_loop()
    tick = min(1.0, progress_every_s)
    next_progress = next_orphans = loop.time()
    counted: dict[str, Counted] = {}  # request_id -> what its last note counted
    while True:
        await asyncio.sleep(tick)
        now = loop.time()
        try:
            if spool.pending:
                n = await spool.replay(ledger)
                if n:
                    metrics.replayed += n
                    log.info("replayed spooled settlements n=%d left=%d", n, len(spool.pending))
            metrics.spool_pending = len(spool.pending)
            if now >= next_progress:
                next_progress = now + progress_every_s
                notes = []
                live = dict(proxy.exchanges)
                for req, ex in live.items():
                    note, counted[req] = await progress_note(ex, proxy.ledger.now_ms, counted.get(req, (0, 0, "")))
                    notes.append(note)
                for req in counted.keys() - live.keys():
                    del counted[req]
                await asyncio.to_thread(spool.write_live, notes)
            if now >= next_orphans:
                next_orphans = now + ORPHANS_EVERY_S
                replayed, interrupted = await recover_orphans(spool.directory, ledger, skip=spool.ident)
                metrics.replayed += replayed
                metrics.interrupted += interrupted
        except Exception as exc:
            log.warning("settlement keeper pass failed: %s", type(exc).__name__)
