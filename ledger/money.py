"""Conversions at the edges: decimal currency strings <-> integer micro-units, and time stamps."""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_CEILING, Decimal, InvalidOperation

__all__ = ["MAX_MICRO", "MICRO", "format_micro", "iso_ms", "parse_amount", "price_per_million_micro"]

MICRO = 1_000_000
# Lua does arithmetic in doubles, exact below 2**53; stay far below with room for sums.
MAX_MICRO = 2**50


def parse_amount(text: str | int) -> int:
    """'12.5' currency units -> 12_500_000 micro-units; refuses more precision than a micro-unit."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise ValueError("amount must be a positive number")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError("amount has more than 6 decimal places")
    if micro > MAX_MICRO:
        raise ValueError("amount too large")
    return int(micro)


def price_per_million_micro(text: str) -> int:
    """A model price 'currency units per 1M tokens' as micro-units per 1M tokens (rounded up)."""
    value = Decimal(str(text).strip())
    if not value.is_finite() or value < 0:
        raise ValueError(f"bad price: {text!r}")
    return int((value * MICRO).to_integral_value(rounding=ROUND_CEILING))


def format_micro(micro: int, places: int = 2) -> str:
    """Display helper: 12_345_678 -> '12.35' (display only; never fed back into the ledger)."""
    q = Decimal(micro) / MICRO
    return f"{q:.{places}f}"


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds: 0 -> '1970-01-01T00:00:00.000Z'."""
    if ms is None:
        return None
    global _iso_second
    seconds, millis = divmod(ms, 1000)
    cached = _iso_second
    if cached[0] != seconds:
        # Every request formats two of these: the date part is made once a second.
        cached = _iso_second = (seconds, dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{millis:03d}Z"


_iso_second: tuple[int, str] = (-1, "")
