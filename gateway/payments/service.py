"""Top-ups and refunds: start an Omise charge, credit a successful one exactly once, refund unused credit.

Crediting happens in one place, :meth:`Payments.settle_charge`, whatever brought the charge here
(the 3-D Secure return, the ``charge.complete`` webhook, the reconciliation pass): it is always
given a charge fetched from Omise's API, never a webhook body, and credits with the Omise charge
id as the ledger's idempotency reference, so concurrent and repeated arrivals make one bucket.

Nothing here sees card data: the browser gives Omise.js the card and us a single-use token id.
Logs carry ids, statuses and amounts only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ledger import errors as LE
from ledger.keys import shard_of
from ledger.ledger import Ledger, Topup
from ledger.money import iso_ms

from .. import errors as E
from ..omise_api import Charge, OmiseClient, OmiseError, OmiseUnavailable
from .amounts import micro_per_minor

__all__ = [
    "TOPUP_REFERENCE_PREFIX",
    "Payments",
    "RefundOutcome",
    "new_refund_id",
    "topup_json",
]

log = logging.getLogger("gateway.payments")

# A top-up bucket's ledger reference: the Omise charge id behind it (what a refund pays back to).
TOPUP_REFERENCE_PREFIX: Final = "omise:"
# Omise charge status -> our top-up status ("reversed": authorised, then released unpaid).
_FINAL: Final = {"failed": "failed", "expired": "expired", "reversed": "failed"}


def new_refund_id(account_id: str, now_ms: int) -> str:
    return f"rfd_{shard_of(account_id):02x}{now_ms:013d}{secrets.token_hex(5)}"


def topup_json(t: Topup, *, currency: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "topup_id": t.topup_id,
        "status": t.status,
        "amount_micro": t.amount_micro,
        "currency": currency,
        "method": t.method,
        "created_at": iso_ms(t.created_at),
        "updated_at": iso_ms(t.updated_at),
    }
    if t.bucket_id:
        out["bucket_id"] = t.bucket_id
    if t.status in ("failed", "expired"):
        out["failure_code"] = t.failure_code or None
        out["failure_message"] = t.failure_message or None
    return out


@dataclass(frozen=True, slots=True)
class RefundOutcome:
    refund_id: str
    bucket_id: str
    amount_micro: int
    amount_minor: int
    status: str  # confirmed | reverted | processing (Omise did not answer; retried by the sync)
    omise_refund_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "refund_id": self.refund_id,
            "bucket_id": self.bucket_id,
            "amount_micro": self.amount_micro,
            "status": self.status,
            "omise_refund_id": self.omise_refund_id,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
        }


class Payments:
    """Top-ups and refunds over one ledger and one Omise client (None: Omise is not configured)."""

    def __init__(
        self,
        ledger: Ledger,
        omise: OmiseClient | None,
        *,
        currency: str,
        public_base_url: str,
        bucket_life_s: int = 30 * 24 * 3600,
    ) -> None:
        self.ledger = ledger
        self._omise = omise
        self.currency = currency.upper()
        self.public_base_url = public_base_url.rstrip("/")
        self.bucket_life_s = bucket_life_s

    @property
    def enabled(self) -> bool:
        return self._omise is not None

    @property
    def omise(self) -> OmiseClient:
        if self._omise is None:
            raise E.ServiceUnavailable("Top-ups are not configured on this server (Omise keys are not set).")
        return self._omise

    def return_uri(self, topup_id: str) -> str:
        return f"{self.public_base_url}/topups/{topup_id}/return"

    # ----- top-ups ----------------------------------------------------------------------------
    async def start_topup(
        self, account_id: str, amount_micro: int, amount_minor: int, *, token: str | None
    ) -> tuple[Topup, Charge | None]:
        """Record a pending top-up, then ask Omise for the charge (card token, or PromptPay when
        token is None). Returns the top-up as it stands and the charge (for its authorize_uri or QR)."""
        omise = self.omise
        method = "card" if token is not None else "promptpay"
        topup = await self.ledger.create_topup(
            account_id, amount_micro, amount_minor=amount_minor, currency=self.currency, method=method
        )
        metadata = {"topup_id": topup.topup_id}
        key = f"topup:{topup.topup_id}"
        try:
            if token is not None:
                charge = await omise.create_card_charge(
                    amount_minor, self.currency, token, self.return_uri(topup.topup_id), metadata, key
                )
            else:
                charge = await omise.create_promptpay_charge(
                    amount_minor, self.currency, self.return_uri(topup.topup_id), metadata, key
                )
        except OmiseUnavailable:
            # The charge may exist: the top-up stays pending; a webhook or the sync settles it.
            log.warning("topup %s: Omise did not answer the charge request", topup.topup_id)
            raise E.ServiceUnavailable(
                "The payment service did not answer. If you were charged, the credit appears within minutes."
            ) from None
        except OmiseError as err:
            # Omise refused before any charge existed (used token, amount below its minimum...).
            log.info("topup %s: Omise refused the charge (%s)", topup.topup_id, err.code)
            await self.ledger.update_topup(
                topup.topup_id, "failed", failure_code=err.code, failure_message=err.message
            )
            return await self._reread(topup.topup_id), None
        log.info("topup %s: charge %s is %s", topup.topup_id, charge.id, charge.status)
        return await self.settle_charge(charge), charge

    async def settle_charge(self, charge: Charge) -> Topup:
        """Bring our top-up in line with a charge just fetched from Omise; credit it if successful.

        Raises NotFound when the charge is not one of our top-ups (metadata, amount or currency do
        not match); never credits on anything but Omise's own answer.
        """
        topup_id = charge.metadata.get("topup_id", "")
        topup = await self.ledger.topup(topup_id)
        if topup is None:
            log.warning("charge %s names no top-up of ours", charge.id)
            raise E.NotFound("No top-up of ours for this charge.")
        # SECURITY: the amount and currency charged must be what the top-up asked for.
        if charge.amount != topup.amount_minor or charge.currency != topup.currency:
            log.warning("charge %s does not match topup %s (amount or currency)", charge.id, topup_id)
            raise E.NotFound("The charge does not match its top-up.")
        if topup.charge_id and topup.charge_id != charge.id:
            log.warning("charge %s is not the charge of topup %s", charge.id, topup_id)
            raise E.NotFound("The charge does not match its top-up.")

        if charge.status == "successful" and charge.paid:
            try:
                credit = await self.ledger.credit(
                    topup.account_id,
                    topup.amount_micro,
                    reference=TOPUP_REFERENCE_PREFIX + charge.id,
                    source="topup",
                    life_s=self.bucket_life_s,
                )
            except (LE.AccountClosed, LE.UnknownAccount):
                return await self._refund_closed(topup, charge)
            await self.ledger.update_topup(
                topup_id, "successful", charge_id=charge.id, bucket_id=credit.bucket_id
            )
            if credit.created:
                log.info("topup %s credited as bucket %s (charge %s)", topup_id, credit.bucket_id, charge.id)
        elif charge.status in _FINAL:
            await self.ledger.update_topup(
                topup_id,
                _FINAL[charge.status],
                charge_id=charge.id,
                failure_code=charge.failure_code or charge.status,
                failure_message=charge.failure_message or f"The payment was {charge.status}.",
            )
        else:
            await self.ledger.update_topup(topup_id, "pending", charge_id=charge.id)
        return await self._reread(topup_id)

    async def refresh(self, topup: Topup) -> Topup:
        """Ask Omise about a pending top-up's charge (the return page, polling, the sync)."""
        if topup.status != "pending" or not topup.charge_id:
            return topup
        return await self.settle_charge(await self.omise.retrieve_charge(topup.charge_id))

    async def _refund_closed(self, topup: Topup, charge: Charge) -> Topup:
        """Paid after the account was closed: no bucket can take it, so the whole charge goes back."""
        code, message = "account_closed", "The account was closed; the payment was refunded."
        remaining = charge.amount - charge.refunded_amount
        try:
            if remaining > 0:
                await self.omise.create_refund(
                    charge.id, remaining, {"topup_id": topup.topup_id}, f"closed:{charge.id}"
                )
        except OmiseError as err:
            log.warning("topup %s: refund after closure failed (%s)", topup.topup_id, err.code)
            message = "The account was closed; the payment could not be refunded automatically."
        await self.ledger.update_topup(
            topup.topup_id, "failed", charge_id=charge.id, failure_code=code, failure_message=message
        )
        return await self._reread(topup.topup_id)

    async def _reread(self, topup_id: str) -> Topup:
        topup = await self.ledger.topup(topup_id)
        assert topup is not None, "top-ups are never deleted"
        return topup

    # ----- refunds ----------------------------------------------------------------------------
    async def refund_bucket(
        self, account_id: str | None, bucket_id: str, *, amount_micro: int | None = None
    ) -> RefundOutcome:
        """Refund a top-up bucket's unused, unexpired credit (all of it, or `amount_micro`).

        The credit leaves the bucket first, atomically (it cannot be spent meanwhile), in whole
        satang (a sub-satang remainder stays); then Omise refunds it; if Omise refuses, the credit
        goes back. ``account_id`` None: an operator refunding any account's bucket.
        """
        omise = self.omise
        owner = await self.ledger.bucket_account(bucket_id)
        bucket = await self.ledger.bucket(bucket_id)
        if bucket is None or owner is None or (account_id is not None and owner != account_id):
            raise LE.UnknownBucket("No such bucket on this account.")
        if bucket.source != "topup" or not bucket.reference.startswith(TOPUP_REFERENCE_PREFIX):
            raise LE.NotRefundable("Only credit bought with a top-up can be refunded.")
        if bucket.expires_at <= self.ledger.now_ms():
            raise LE.NotRefundable("The bucket has expired; expired credit is not refundable.")
        charge_id = bucket.reference.removeprefix(TOPUP_REFERENCE_PREFIX)
        per = micro_per_minor(self.currency)
        if amount_micro is not None and (amount_micro <= 0 or amount_micro % per):
            raise E.BadRequest("'amount' must be a positive amount in whole satang.", param="amount")

        refund_id = new_refund_id(owner, self.ledger.now_ms())
        taken = 0
        for _ in range(3):  # spending may shrink the bucket between the read and the take
            want = amount_micro if amount_micro is not None else (bucket.remaining_micro // per) * per
            if want <= 0:
                raise LE.NotRefundable(
                    "Nothing refundable is left in this bucket (consumed credit is not refundable)."
                )
            try:
                taken = await self.ledger.refund(owner, bucket_id, refund_id=refund_id, amount_micro=want)
                break
            except LE.NotRefundable as err:
                if amount_micro is not None or "remaining_micro" not in err.details:
                    raise
                fresh = await self.ledger.bucket(bucket_id)
                if fresh is None:
                    raise
                bucket = fresh
        else:
            raise LE.NotRefundable("The bucket is being spent right now; try the refund again.")

        minor = taken // per
        try:
            refund = await omise.create_refund(
                charge_id, minor, {"refund_id": refund_id, "bucket_id": bucket_id}, f"refund:{refund_id}"
            )
        except OmiseUnavailable:
            # Unknown outcome: the credit stays out; the sync retries with the same idempotency key.
            log.warning("refund %s: Omise did not answer; left for the sync", refund_id)
            return RefundOutcome(refund_id, bucket_id, taken, minor, "processing")
        except OmiseError as err:
            await self.ledger.finish_refund(owner, refund_id, ok=False, external_ref=f"error:{err.code}")
            log.info("refund %s refused by Omise (%s); credit put back", refund_id, err.code)
            return RefundOutcome(
                refund_id,
                bucket_id,
                taken,
                minor,
                "reverted",
                failure_code=err.code,
                failure_message=err.message,
            )
        await self.ledger.finish_refund(owner, refund_id, ok=True, external_ref=refund.id)
        log.info("refund %s confirmed: %d minor units of charge %s", refund_id, minor, charge_id)
        return RefundOutcome(refund_id, bucket_id, taken, minor, "confirmed", omise_refund_id=refund.id)

    async def retry_refund(self, refund: Mapping[str, Any]) -> str:
        """Finish a refund whose Omise call had no answer (a row of the refunds table). Returns its status."""
        refund_id, account_id, bucket_id = refund["refund_id"], refund["account_id"], refund["bucket_id"]
        status: str | None = await self.ledger.redis.hget(
            self.ledger.keys.pfx_for(account_id) + "rf:" + refund_id, "status"
        )
        if status != "taken":
            return status or "unknown"
        bucket = await self.ledger.bucket(bucket_id)
        if bucket is None or not bucket.reference.startswith(TOPUP_REFERENCE_PREFIX):
            return "taken"
        charge_id = bucket.reference.removeprefix(TOPUP_REFERENCE_PREFIX)
        minor = int(refund["amount_micro"]) // micro_per_minor(self.currency)
        try:
            done = await self.omise.create_refund(
                charge_id, minor, {"refund_id": refund_id, "bucket_id": bucket_id}, f"refund:{refund_id}"
            )
        except OmiseUnavailable:
            return "taken"
        except OmiseError as err:
            await self.ledger.finish_refund(account_id, refund_id, ok=False, external_ref=f"error:{err.code}")
            return "reverted"
        await self.ledger.finish_refund(account_id, refund_id, ok=True, external_ref=done.id)
        return "confirmed"
