"""Refusals the ledger gives; the gateway maps them to HTTP in its error middleware."""

from __future__ import annotations

__all__ = [
    "AccountClosed",
    "ConcurrencyLimit",
    "InsufficientFunds",
    "KeyLimit",
    "LedgerError",
    "LedgerLost",
    "NotRefundable",
    "UnknownAccount",
    "UnknownBucket",
    "UnknownKey",
]


class LedgerError(Exception):
    def __init__(self, message: str, **details: int) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InsufficientFunds(LedgerError):
    @property
    def available_micro(self) -> int:
        return self.details.get("available_micro", 0)


class ConcurrencyLimit(LedgerError):
    pass


class AccountClosed(LedgerError):
    pass


class UnknownAccount(LedgerError):
    pass


class UnknownKey(LedgerError):
    pass


class UnknownBucket(LedgerError):
    pass


class KeyLimit(LedgerError):
    pass


class NotRefundable(LedgerError):
    pass


class LedgerLost(LedgerError):
    """The ledger's Redis lost its data (no epoch marker): nothing may act on it until `rebuild`."""

    def __init__(self, message: str = "the ledger is being restored") -> None:
        super().__init__(message)
