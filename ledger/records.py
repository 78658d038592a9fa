"""What the ledger's reads and operations answer: ids, amounts (integer micro-units), times (ms),
statuses; and the parsing of the Redis hashes they are read from."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "TOPUP_STATUSES",
    "AccountInfo",
    "Balance",
    "BucketInfo",
    "Credit",
    "KeyInfo",
    "KeyRef",
    "NewKey",
    "Settlement",
    "Topup",
    "bucket_of",
    "decode_draws",
    "topup_of",
]


@dataclass(frozen=True, slots=True)
class KeyRef:
    account_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    key: str  # shown to the user once; never stored ("" when an earlier call made it: see created)
    prefix: str
    created: bool = True  # False: a retry with the same reference; the key was shown the first time


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    prefix: str
    created_at: int
    last_used_at: int | None


@dataclass(frozen=True, slots=True)
class Credit:
    bucket_id: str
    amount_micro: int
    expires_at: int
    created: bool  # False when the reference had been credited before


@dataclass(frozen=True, slots=True)
class BucketInfo:
    bucket_id: str
    amount_micro: int
    remaining_micro: int
    expires_at: int
    created_at: int
    source: str
    reference: str


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: str
    available_micro: int
    reserved_micro: int
    buckets: list[BucketInfo]
    low_balance: bool
    low_threshold_micro: int


@dataclass(frozen=True, slots=True)
class AccountInfo:
    account_id: str
    status: str
    email: str | None
    created_at: int
    credited: int
    reserved: int
    consumed: int
    refunded: int
    forfeited: int
    low_threshold_micro: int


@dataclass(frozen=True, slots=True)
class Settlement:
    charged_micro: int
    shortfall_micro: int
    draws: list[tuple[str, int]] = field(default_factory=list)
    already: bool = False


@dataclass(frozen=True, slots=True)
class Topup:
    """A top-up: an Omise charge on its way to a bucket. Ids, amounts, status and Omise's reason only."""

    topup_id: str
    account_id: str
    amount_micro: int
    amount_minor: int  # what Omise charges, in the currency's smallest unit (satang)
    currency: str  # lower-case ISO 4217
    method: str  # "card" or "promptpay"
    status: str  # pending | successful | failed | expired
    charge_id: str  # "" until Omise answered
    failure_code: str
    failure_message: str
    bucket_id: str  # "" until credited
    created_at: int
    updated_at: int


TOPUP_STATUSES = ("pending", "successful", "failed", "expired")


def decode_draws(enc: str) -> list[tuple[str, int]]:
    out = []
    for part in enc.split(",") if enc else ():
        bid, _, amt = part.rpartition(":")
        out.append((bid, int(amt)))
    return out


def topup_of(topup_id: str, h: dict[str, str]) -> Topup:
    return Topup(
        topup_id=topup_id,
        account_id=h["account"],
        amount_micro=int(h["amount"]),
        amount_minor=int(h["minor"]),
        currency=h["currency"],
        method=h["method"],
        status=h["status"],
        charge_id=h.get("charge", ""),
        failure_code=h.get("failure_code", ""),
        failure_message=h.get("failure_message", ""),
        bucket_id=h.get("bucket", ""),
        created_at=int(h["created_at"]),
        updated_at=int(h["updated_at"]),
    )


def bucket_of(bucket_id: str, h: dict[str, str]) -> BucketInfo:
    return BucketInfo(
        bucket_id=bucket_id,
        amount_micro=int(h["amount"]),
        remaining_micro=int(h["remaining"]),
        expires_at=int(h["expires_at"]),
        created_at=int(h["created_at"]),
        source=h["source"],
        reference=h["ref"],
    )
