"""Price books: prices per plan and model, plan terms (free monthly allowance, minimum commitment), all
with effective dates. Money is ``Decimal`` from strings, never a float.

One book is shared by billing (invoices) and the gateway (prepaid plans reserve and draw a request's cost at
admission), both loading the same file, so both compute every amount alike. A price must be a whole number of
money units (10⁻⁹, ``serving.commerce.money``) per token and per request, so that a request's cost is exact in
units too.

A price book is TOML::

    currency = "USD"

    [[terms]]                        # per plan ("*": every plan); the latest effective at the period start applies
    plan = "standard"
    effective_from = 2026-01-01T00:00:00Z
    monthly_allowance = "5.00"       # credits taken off each monthly invoice
    minimum_commitment = "0"         # a monthly invoice is never below this

    [[price]]                        # per plan and model ("*" matches any; a version "minilm-l6@2026-11" without
    plan = "*"                       # a price of its own matches its base "minilm-l6"); the most specific match
    model = "minilm-l6"              # wins, then the latest effective_from at or before the usage time
    effective_from = 2026-01-01T00:00:00Z
    input_per_1k = "0.0200"          # per 1,000 input tokens
    output_per_1k = "0"              # per 1,000 output tokens
    per_request = "0.0001"           # per request
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from serving.commerce.money import MoneyError, to_units

UNIT_PRICES = MappingProxyType(
    {"input_tokens": "input_per_1k", "output_tokens": "output_per_1k", "requests": "per_request"}
)
UNIT_SIZE = MappingProxyType({"input_tokens": Decimal(1000), "output_tokens": Decimal(1000), "requests": Decimal(1)})


class PricingError(ValueError):
    """A price book that cannot be used, or usage that no price covers."""


@dataclass(frozen=True)
class Price:
    plan: str
    model: str
    effective_from: float
    input_per_1k: Decimal
    output_per_1k: Decimal
    per_request: Decimal

    def unit_price(self, unit: str) -> Decimal:
        value: Decimal = getattr(self, UNIT_PRICES[unit])
        return value

    def cost(self, input_tokens: int, output_tokens: int, requests: int = 1) -> Decimal:
        """Exactly what an invoice line charges for this usage (no rounding)."""
        return (
            input_tokens * self.input_per_1k / UNIT_SIZE["input_tokens"]
            + output_tokens * self.output_per_1k / UNIT_SIZE["output_tokens"]
            + requests * self.per_request
        )

    def cost_units(self, input_tokens: int, output_tokens: int, requests: int = 1) -> int:
        """``cost`` in money units: exact, because every price is whole units per token and per request."""
        return to_units(self.cost(input_tokens, output_tokens, requests))


@dataclass(frozen=True)
class Terms:
    plan: str
    effective_from: float
    monthly_allowance: Decimal = Decimal(0)
    minimum_commitment: Decimal = Decimal(0)


def _money(where: str, raw: Any) -> Decimal:
    if not isinstance(raw, str):
        raise PricingError(f"{where}: money must be a quoted decimal string, not {type(raw).__name__} {raw!r}")
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:
        raise PricingError(f"{where}: not a decimal: {raw!r}") from exc
    if not value.is_finite() or value < 0:
        raise PricingError(f"{where}: must be a finite amount >= 0: {raw!r}")
    return value


def _per_unit(where: str, price: Decimal, size: Decimal) -> Decimal:
    """Refuses a price finer than one money unit per token (or request): costs must be exact in units."""
    try:
        to_units(price / size)
    except MoneyError as exc:
        raise PricingError(f"{where}: {price} per {size} is finer than 1e-9 per unit of usage") from exc
    return price


def _when(where: str, raw: Any) -> float:
    if not isinstance(raw, datetime) or raw.tzinfo is None:
        raise PricingError(f"{where}: effective_from must be a TOML date-time with an offset (e.g. ...Z)")
    return raw.timestamp()


class PriceBook:
    def __init__(self, currency: str, prices: list[Price], terms: list[Terms]) -> None:
        self.currency = currency
        self.prices = prices
        self.terms = terms
        # (plan, model) -> its matching tiers, most specific first, each latest-effective first: the gateway looks a
        # price up on every prepaid request
        self._tiers: dict[tuple[str, str], list[list[Price]]] = {}

    @classmethod
    def parse(cls, text: str) -> PriceBook:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PricingError(f"price book is not valid TOML: {exc}") from exc
        prices = []
        for i, entry in enumerate(data.get("price", [])):
            where = f"price[{i}]"
            prices.append(
                Price(
                    plan=str(entry.get("plan", "*")),
                    model=str(entry.get("model", "*")),
                    effective_from=_when(where, entry.get("effective_from")),
                    **{
                        field: _per_unit(
                            f"{where}.{field}", _money(f"{where}.{field}", entry.get(field, "0")), UNIT_SIZE[unit]
                        )
                        for unit, field in UNIT_PRICES.items()
                    },
                )
            )
        terms = [
            Terms(
                plan=str(entry.get("plan", "*")),
                effective_from=_when(f"terms[{i}]", entry.get("effective_from")),
                monthly_allowance=_per_unit(
                    f"terms[{i}].monthly_allowance",
                    _money(f"terms[{i}].monthly_allowance", entry.get("monthly_allowance", "0")),
                    Decimal(1),
                ),
                minimum_commitment=_money(f"terms[{i}].minimum_commitment", entry.get("minimum_commitment", "0")),
            )
            for i, entry in enumerate(data.get("terms", []))
        ]
        return cls(str(data.get("currency", "USD")), prices, terms)

    @classmethod
    def load(cls, path: Path | None) -> PriceBook:
        """The TOML file at ``path``; None: the book shipped with the package."""
        if path is None:
            return cls.parse(resources.files("serving.commerce").joinpath("pricebook.toml").read_text())
        return cls.parse(path.read_text())

    def price(self, plan: str, model: str, at: float) -> Price:
        """The price for usage at ``at``: the most specific (plan, model) match, then the latest effective. A model
        version (``minilm-l6@2026-11``) without a price of its own is priced as its base model (``minilm-l6``)."""
        tiers = self._tiers.get((plan, model))
        if tiers is None:
            base = model.partition("@")[0]
            models = (model, base) if base != model else (model,)
            wanted = [(want_plan, want_model) for want_plan in (plan, "*") for want_model in (*models, "*")]
            tiers = [
                sorted((p for p in self.prices if (p.plan, p.model) == want), key=lambda p: -p.effective_from)
                for want in wanted
            ]
            self._tiers[(plan, model)] = tiers
        for tier in tiers:
            for price in tier:
                if price.effective_from <= at:
                    return price
        raise PricingError(f"no price for plan {plan!r}, model {model!r} at {at}")

    def terms_for(self, plan: str, at: float) -> Terms:
        for want in (plan, "*"):
            effective = [t for t in self.terms if t.plan == want and t.effective_from <= at]
            if effective:
                return max(effective, key=lambda t: t.effective_from)
        return Terms(plan, 0.0)

    def changes(self, start: float, end: float) -> list[float]:
        """Every time strictly inside ``(start, end)`` where some price takes effect: line items split there."""
        return sorted({p.effective_from for p in self.prices if start < p.effective_from < end})
