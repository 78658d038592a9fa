"""Reconciliation with Omise: ask about every pending top-up (and unanswered refund) and settle it.

Used by ``python -m gateway payments sync-omise`` and by a background pass in the web process (one process
at a time, under a short Redis lock) for top-ups pending longer than a minute: a lost webhook or
an abandoned return page still ends in a bucket or a recorded failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ledger.store import Store

from .. import errors as E
from ..omise_api import OmiseError
from .service import Payments

__all__ = ["SYNC_EVERY_S", "SyncReport", "run_reconciler", "sync_pending"]

log = logging.getLogger("gateway.payments.sync")

SYNC_EVERY_S: Final = 60.0
PENDING_AGE_S: Final = 60
# A top-up that never got a charge id (Omise never answered its creation) is given up after this;
# if the charge did exist and succeeds later, its webhook still credits it (settle_charge accepts it).
NO_CHARGE_GIVE_UP_S: Final = 3600


@dataclass(slots=True)
class SyncReport:
    checked: int = 0
    credited: int = 0
    failed: int = 0
    still_pending: int = 0
    errors: int = 0
    refunds_retried: int = 0
    topups: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "credited": self.credited,
            "failed": self.failed,
            "still_pending": self.still_pending,
            "errors": self.errors,
            "refunds_retried": self.refunds_retried,
            "topups": self.topups,
        }


async def sync_pending(
    payments: Payments,
    *,
    older_than_s: int = 0,
    store: Store | None = None,
    limit: int = 500,
) -> SyncReport:
    """Ask Omise about each pending top-up older than `older_than_s`; credit or fail it. With a
    store, also retry refunds whose Omise call went unanswered (same idempotency key)."""
    report = SyncReport()
    ledger = payments.ledger
    for topup in await ledger.pending_topups(older_than_ms=older_than_s * 1000, limit=limit):
        report.checked += 1
        try:
            if topup.charge_id:
                after = await payments.refresh(topup)
            elif ledger.now_ms() - topup.created_at >= NO_CHARGE_GIVE_UP_S * 1000:
                await ledger.update_topup(
                    topup.topup_id,
                    "expired",
                    failure_code="no_charge",
                    failure_message="The payment was never started with Omise.",
                )
                after = await ledger.topup(topup.topup_id) or topup
            else:
                after = topup
        except (OmiseError, E.GatewayError) as err:
            report.errors += 1
            log.warning("sync: topup %s not settled (%s)", topup.topup_id, type(err).__name__)
            continue
        if after.status == "successful":
            report.credited += 1
        elif after.status in ("failed", "expired"):
            report.failed += 1
        else:
            report.still_pending += 1
        report.topups.append(
            {"topup_id": after.topup_id, "status": after.status, "charge_id": after.charge_id}
        )
    if store is not None:
        cutoff = ledger.now_ms() - older_than_s * 1000
        rows = await asyncio.to_thread(
            store.query,
            "SELECT refund_id, account_id, bucket_id, amount_micro FROM refunds "
            "WHERE status = 'taken' AND created_ms <= ? ORDER BY created_ms LIMIT ?",
            (cutoff, limit),
        )
        for row in rows:
            try:
                status = await payments.retry_refund(dict(row))
            except OmiseError:
                report.errors += 1
                continue
            if status in ("confirmed", "reverted"):
                report.refunds_retried += 1
    return report


async def run_reconciler(
    payments: Payments,
    stop: asyncio.Event,
    *,
    lock_key: str,
    store_factory: Callable[[], Store | None] = lambda: None,
    every_s: float = SYNC_EVERY_S,
) -> None:
    """Every `every_s`, one process (whoever takes the Redis lock) runs a sync of old pending top-ups."""
    redis = payments.ledger.redis
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        if stop.is_set():
            return
        try:
            if await redis.set(lock_key, "1", nx=True, ex=max(1, int(every_s * 0.9))):
                report = await sync_pending(payments, older_than_s=PENDING_AGE_S, store=store_factory())
                if report.checked or report.refunds_retried:
                    log.info(
                        "omise sync: checked=%d credited=%d failed=%d pending=%d errors=%d refunds=%d",
                        report.checked,
                        report.credited,
                        report.failed,
                        report.still_pending,
                        report.errors,
                        report.refunds_retried,
                    )
        except Exception as exc:  # keep the loop alive; the next pass tries again
            log.warning("omise sync pass failed: %s", type(exc).__name__)
