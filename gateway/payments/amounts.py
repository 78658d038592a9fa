"""Money at the Omise edge: top-up amounts in currency units <-> micro-units <-> Omise's smallest unit."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Final

from ledger.money import MICRO

from .. import errors as E

__all__ = ["micro_per_minor", "minor_per_unit", "parse_topup_amount"]

# ISO 4217 currencies without a minor unit, as Omise charges them (JPY 500 is amount=500).
_ZERO_DECIMAL: Final = frozenset({"jpy", "krw", "vnd"})


def minor_per_unit(currency: str) -> int:
    """How many of Omise's smallest units make one currency unit (THB: 100 satang)."""
    return 1 if currency.lower() in _ZERO_DECIMAL else 100


def micro_per_minor(currency: str) -> int:
    """Micro-units in one smallest unit (THB: 1 satang = 10,000 micro-units)."""
    return MICRO // minor_per_unit(currency)


def parse_topup_amount(raw: object, currency: str, *, minimum: int, maximum: int) -> tuple[int, int]:
    """A top-up amount in currency units (500, "500", "99.50") -> (micro-units, smallest units).

    Refuses what Omise could not charge exactly (fractions of a satang) and anything outside the
    configured minimum and maximum (whole currency units).
    """
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise E.BadRequest("'amount' must be a number of currency units, e.g. 500.", param="amount")
    try:
        value = Decimal(str(raw).strip())
    except InvalidOperation:
        raise E.BadRequest("'amount' must be a number of currency units, e.g. 500.", param="amount") from None
    if not value.is_finite():
        raise E.BadRequest("'amount' must be a number of currency units, e.g. 500.", param="amount")
    if value < minimum or value > maximum:
        raise E.BadRequest(f"'amount' must be between {minimum} and {maximum}.", param="amount")
    minor = value * minor_per_unit(currency)
    if minor != minor.to_integral_value():
        raise E.BadRequest("'amount' has more decimals than the currency allows.", param="amount")
    minor_int = int(minor)
    return minor_int * micro_per_minor(currency), minor_int
