"""Settling a finished request: its bill (gateway.exchange) to the ledger, off the response path.

Where the bill is known at once (the upstream reported its whole usage, or nothing was produced) the
settle goes down the script lane without a task and its reply is handled in a callback; otherwise
(an exact count to make, the lane not there or failing) a task settles it with a few quick retries.
A settlement is never dropped: what Redis does not take waits in the spool (ledger/spool.py) until it
does; settle is idempotent on the request id, so sending one twice charges once. Ids and counts only
in the log lines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ledger import errors as LE
from ledger.ledger import Ledger, Settlement
from ledger.spool import Spool, Spooled

from .exchange import Exchange, bill_for, bill_now
from .metrics import Metrics

__all__ = ["SETTLE_ATTEMPTS", "Settlements"]

log = logging.getLogger("gateway.proxy")  # (the operators' log lines keep their logger's name)

# A few quick tries (the Redis client already retries a stale connection), then the spool: a
# settlement is never dropped, and a web process never queues minutes of retries in memory.
SETTLE_ATTEMPTS = 3


class Settlements:
    def __init__(self, ledger: Ledger, metrics: Metrics, background: set[asyncio.Future[Any]]) -> None:
        self.ledger = ledger
        self.metrics = metrics
        # Pending settlements and releases (tasks, or the script lane's futures): shutdown waits.
        self.background = background
        # Settlements Redis did not take wait here (on disk) until it does; None: log and lose them.
        self.spool: Spool | None = None

    def in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def soon(self, ex: Exchange) -> None:
        """The common case without a task: the upstream reported its whole usage (or nothing was
        produced), so the bill is known now, and the script lane takes the settle call at once; its
        reply is handled in a callback. Anything else (an exact count to make, the lane not there or
        failing) goes the awaiting way, ``settle``, with its retries and its spool."""
        tracker = ex.tracker
        if ex.status == "bad_request" or (
            (ex.produced or tracker.usage is not None) and (not tracker.complete or tracker.needs_prompt_estimate)
        ):
            self.in_background(self.settle(ex))
            return
        try:
            bill = bill_now(ex, self.ledger.now_ms)  # no counting here: the usage is the upstream's
            started = self.ledger.settle_started(
                bill.account_id, bill.request_id, bill.charge_micro, metering=bill.metering
            )
        except Exception:
            started = None  # (the awaiting way meets the same trouble, and logs it)
        if started is None:
            self.in_background(self.settle(ex))
            return
        self.background.add(started)
        started.add_done_callback(functools.partial(self._answered, ex, bill))

    def _answered(self, ex: Exchange, bill: Spooled, started: asyncio.Future[Any]) -> None:
        self.background.discard(started)
        if started.cancelled():
            self.to_spool(bill, "shutdown")  # shutdown's deadline came first
            return
        try:
            settlement = self.ledger.settlement_of(started.result())
        except (RedisConnectionError, RedisTimeoutError):
            self.in_background(self._settle_bill(ex, bill))  # retried, as the awaiting way does
            return
        except (LE.LedgerLost, RedisError) as exc:
            self.to_spool(bill, type(exc).__name__)
            return
        except Exception:
            # The lane could not answer (LaneUnavailable, ...): the same bill the awaiting way
            # (idempotent on the request id), with its retries and its spool.
            self.in_background(self._settle_bill(ex, bill))
            return
        self._settled(ex, bill, settlement)

    async def settle(self, ex: Exchange) -> None:
        try:
            if ex.status == "bad_request":
                await self.ledger.release(ex.account_id, ex.request_id, reason="bad_request")
                return
            bill = await bill_for(ex, self.ledger.now_ms)
        except asyncio.CancelledError:
            self.to_spool(bill_now(ex, self.ledger.now_ms), "shutdown")
            raise
        except Exception as exc:
            # The reservation stays; the worker releases it after its deadline. Ids only in the log.
            log.error("settle failed request_id=%s error=%s", ex.request_id, type(exc).__name__)
            return
        await self._settle_bill(ex, bill)

    async def _settle_bill(self, ex: Exchange, bill: Spooled) -> None:
        try:
            settlement = await self._with_retry(bill)
        except asyncio.CancelledError:
            # Shutdown's deadline came first: the settlement waits on disk for the next process.
            self.to_spool(bill, "shutdown")
            raise
        except (LE.LedgerLost, RedisError, OSError) as exc:
            self.to_spool(bill, type(exc).__name__)
            return
        except Exception as exc:
            log.error("settle failed request_id=%s error=%s", ex.request_id, type(exc).__name__)
            return
        self._settled(ex, bill, settlement)

    def _settled(self, ex: Exchange, bill: Spooled, settlement: Settlement) -> None:
        m = bill.metering
        self.metrics.usage(
            ex.model.name, m["input_cache_hit_tokens"], m["input_cache_miss_tokens"], m["output_tokens"],
            settlement.charged_micro,
        )
        log.info(
            "settled request_id=%s model=%s status=%s in=%d/%d out=%d charge_micro=%d shortfall_micro=%d",
            ex.request_id, ex.model.name, ex.status, m["input_cache_hit_tokens"], m["input_cache_miss_tokens"],
            m["output_tokens"], settlement.charged_micro, settlement.shortfall_micro,
        )

    def to_spool(self, bill: Spooled, why: str) -> None:
        if self.spool is None:
            log.error("settlement lost request_id=%s error=%s", bill.request_id, why)
            return
        try:
            self.spool.add(bill)
        except Exception as exc:  # the disk refused it too (full, read-only): say which request
            log.error("settlement lost request_id=%s error=%s spool=%s", bill.request_id, why, type(exc).__name__)
            return
        self.metrics.spooled += 1
        log.warning(
            "settlement spooled until the ledger answers request_id=%s charge_micro=%d error=%s",
            bill.request_id, bill.charge_micro, why,
        )

    async def _with_retry(self, bill: Spooled) -> Settlement:
        """Settle is idempotent on the request id, so a Redis blip is retried (briefly, with jitter);
        what still fails goes to the spool."""
        delay = 0.05
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                return await self.ledger.settle(
                    bill.account_id, bill.request_id, bill.charge_micro, metering=bill.metering
                )
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if attempt == SETTLE_ATTEMPTS - 1:
                    raise
                self.metrics.settle_retries += 1
                log.warning("settle retry request_id=%s attempt=%d", bill.request_id, attempt + 1)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")
