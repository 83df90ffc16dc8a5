"""Money: ``Decimal`` everywhere a person reads or writes an amount, and integer *units* (10⁻⁹ of the currency)
where it must be counted atomically (the prepaid balance in Redis, whose Lua numbers are doubles).

A unit is exact for every price the price book accepts (it refuses a price finer than one unit per token or per
request), so a request's cost in units is an integer and the sum of units is the exact decimal sum billing
computes. Doubles hold integers exactly up to 2^53 units, so one amount in Redis may reach ``MAX_AMOUNT``
(about 9 million in the currency); grants above it are refused.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

UNITS_PER_CURRENCY = 10**9
MAX_UNITS = 2**53 - 1
MAX_AMOUNT = Decimal(MAX_UNITS) / UNITS_PER_CURRENCY


class MoneyError(ValueError):
    """An amount that cannot be used: not a decimal, negative, or finer than one unit."""


def parse_amount(raw: object, *, what: str = "amount") -> Decimal:
    """A decimal string (never a float) > 0 and at most ``MAX_AMOUNT``, in whole units."""
    if not isinstance(raw, str):
        raise MoneyError(f'{what} must be a decimal string such as "25.00", not {type(raw).__name__}')
    try:
        value = Decimal(raw.strip())
    except InvalidOperation as exc:
        raise MoneyError(f"{what} is not a decimal: {raw!r}") from exc
    if not value.is_finite() or value <= 0 or value > MAX_AMOUNT:
        raise MoneyError(f"{what} must be > 0 and at most {MAX_AMOUNT:.2f}: {raw!r}")
    to_units(value, what=what)
    return value


def to_units(amount: Decimal, *, what: str = "amount") -> int:
    """The amount in units; exact or refused."""
    scaled = amount * UNITS_PER_CURRENCY
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"{what} {amount} is finer than 1e-9, the smallest amount counted")
    return int(scaled)


def from_units(units: int) -> Decimal:
    return Decimal(units) / UNITS_PER_CURRENCY


def money(value: Decimal) -> str:
    """Exact, without exponent and without trailing zeros beyond the cent: ``12.5`` → ``"12.50"``."""
    text = format(value, "f")
    if "." in text:
        whole, fraction = text.split(".")
        fraction = fraction.rstrip("0").ljust(2, "0")
        return f"{whole}.{fraction}"
    return f"{text}.00"
