"""Invoices: per partner and period, line items per model, unit and price segment, totals; JSON and CSV.

Money rule (the one rounding in billing): line amounts and the subtotal are exact decimals
(``quantity * unit_price / unit_size``, no rounding); the allowance credit is ``min(allowance, subtotal)``;
the minimum-commitment top-up lifts ``subtotal - credit`` to the commitment; credit grants then pay what is due
(``subtotal - credit + topup``), each as far as it goes, in draw order (``serving.commerce.credits``), exactly;
only the **total** is rounded, to the cent, half to even (``ROUND_HALF_EVEN``). The allowance and the commitment
are monthly amounts: a calendar-month period gets them whole; any other range gets them pro-rated by its share
of the month it starts in (``Period.month_share()``, exact).

The documents hold nothing but their inputs' consequences (no wall-clock time), so computing an invoice
twice from the same counters gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

from billing.counters import UNITS, UsageKey
from billing.periods import Period, iso
from serving.commerce.credits import allocate
from serving.commerce.money import money
from serving.commerce.pricebook import UNIT_SIZE, PriceBook

CENT = Decimal("0.01")
RATIO = Decimal("0.000001")
CSV_HEADER = ("partner", "period", "kind", "model", "unit", "from", "to", "quantity", "unit_price", "amount")


@dataclass(frozen=True)
class LineItem:
    model: str
    unit: str  # input_tokens | output_tokens | requests
    start: float
    end: float
    quantity: int
    unit_price: Decimal  # per 1,000 tokens, or per request
    amount: Decimal  # exact

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "unit": self.unit,
            "from": iso(self.start),
            "to": iso(self.end),
            "quantity": self.quantity,
            "unit_price": money(self.unit_price),
            "per": int(UNIT_SIZE[self.unit]),
            "amount": money(self.amount),
        }


@dataclass(frozen=True)
class GrantBalance:
    """A credit grant an invoice may draw from: what earlier invoices left of it."""

    grant_id: str
    kind: str
    priority: int
    available: Decimal


@dataclass(frozen=True)
class CreditUse:
    grant_id: str
    kind: str
    priority: int
    available: Decimal  # before this invoice
    applied: Decimal  # drawn by this invoice (exact)

    def as_dict(self) -> dict[str, Any]:
        return {
            "grant": self.grant_id,
            "kind": self.kind,
            "priority": self.priority,
            "available": money(self.available),
            "applied": money(self.applied),
            "remaining": money(self.available - self.applied),
        }


@dataclass(frozen=True)
class Drift:
    counter_tokens: int = 0
    ledger_tokens: int = 0
    counter_requests: int = 0
    ledger_requests: int = 0

    @property
    def tokens(self) -> int:
        return self.counter_tokens - self.ledger_tokens

    @property
    def ratio(self) -> Decimal:
        return (Decimal(abs(self.tokens)) / Decimal(max(self.ledger_tokens, 1))).quantize(RATIO, ROUND_HALF_EVEN)

    def exceeds(self, threshold_tokens: int, threshold_ratio: Decimal) -> bool:
        tokens_allowed = max(Decimal(threshold_tokens), threshold_ratio * self.ledger_tokens)
        requests_allowed = threshold_ratio * self.ledger_requests
        return abs(self.tokens) > tokens_allowed or abs(self.counter_requests - self.ledger_requests) > requests_allowed


@dataclass(frozen=True)
class Invoice:
    partner: str
    plan: str
    period: Period
    currency: str
    lines: list[LineItem]
    allowance: Decimal
    commitment: Decimal
    drift: Drift = field(default_factory=Drift)
    needs_review: bool = False
    credits: tuple[CreditUse, ...] = ()  # credit grants drawn, in draw order

    @property
    def subtotal(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0))

    @property
    def credit(self) -> Decimal:
        return min(self.allowance, self.subtotal)

    @property
    def topup(self) -> Decimal:
        return max(Decimal(0), self.commitment - (self.subtotal - self.credit))

    @property
    def due(self) -> Decimal:
        """What the usage and the commitment cost after the allowance, before credit grants (exact)."""
        return self.subtotal - self.credit + self.topup

    @property
    def credits_applied(self) -> Decimal:
        return sum((use.applied for use in self.credits), Decimal(0))

    @property
    def total(self) -> Decimal:
        return (self.due - self.credits_applied).quantize(CENT, ROUND_HALF_EVEN)

    @property
    def status(self) -> str:
        return "needs_review" if self.needs_review else "ok"

    def usage(self) -> dict[str, int]:
        return {unit: sum(line.quantity for line in self.lines if line.unit == unit) for unit in UNITS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "partner": self.partner,
            "plan": self.plan,
            "period": self.period.id,
            "from": iso(self.period.start),
            "to": iso(self.period.end),
            "currency": self.currency,
            "status": self.status,
            "usage": self.usage(),
            "lines": [line.as_dict() for line in self.lines],
            "subtotal": money(self.subtotal),
            "allowance_credit": money(self.credit),
            "minimum_commitment_topup": money(self.topup),
            "credits": [use.as_dict() for use in self.credits],
            "credits_applied": money(self.credits_applied),
            "total": money(self.total),
            "rounding": "total rounded to 0.01, ROUND_HALF_EVEN; lines and subtotal exact",
            "reconciliation": {
                "counter_tokens": self.drift.counter_tokens,
                "ledger_tokens": self.drift.ledger_tokens,
                "drift_tokens": self.drift.tokens,
                "drift_ratio": str(self.drift.ratio),
                "counter_requests": self.drift.counter_requests,
                "ledger_requests": self.drift.ledger_requests,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        base = [self.partner, self.period.id]
        for line in self.lines:
            d = line.as_dict()
            writer.writerow([*base, "line", *(d[column] for column in CSV_HEADER[3:])])
        for kind, amount in (
            ("subtotal", self.subtotal),
            ("allowance_credit", -self.credit),
            ("minimum_commitment_topup", self.topup),
        ):
            writer.writerow([*base, kind, "", "", "", "", "", "", money(amount)])
        for use in self.credits:  # the grant's id in the model column
            writer.writerow([*base, "credit_grant", use.grant_id, "", "", "", "", "", money(-use.applied)])
        writer.writerow([*base, "total", "", "", "", "", "", "", money(self.total)])
        return out.getvalue()


def build_invoices(
    period: Period,
    usage: dict[UsageKey, int],
    boundaries: list[float],
    plans: dict[str, str],
    book: PriceBook,
    default_plan: str,
    include: Iterable[str] = (),
    grants: Mapping[str, Sequence[GrantBalance]] | None = None,
) -> list[Invoice]:
    """One invoice per partner with usage or in ``include`` (and, for monthly periods, per partner in ``plans``);
    ``grants``: per partner, the credit grants it may draw from, in draw order."""
    partners = {key.partner for key in usage if usage[key]} | set(include)
    if period.monthly:
        partners |= set(plans)
    invoices = []
    share = period.month_share()
    for partner in sorted(partners):
        plan = plans.get(partner, default_plan)
        lines: list[LineItem] = []
        models = sorted({key.model for key in usage if key.partner == partner})
        with localcontext() as exact:
            exact.prec = 60  # far above any quantity * price: the arithmetic stays exact
            for model in models:
                for unit in UNITS:
                    lines.extend(_segments(partner, plan, model, unit, usage, boundaries, book))
        terms = book.terms_for(plan, period.start)
        invoice = Invoice(
            partner=partner,
            plan=plan,
            period=period,
            currency=book.currency,
            lines=lines,
            allowance=terms.monthly_allowance * share,
            commitment=terms.minimum_commitment * share,
        )
        usable = list((grants or {}).get(partner, ()))
        drawn = dict(allocate(((g.grant_id, g.available) for g in usable), invoice.due))
        uses = tuple(
            CreditUse(g.grant_id, g.kind, g.priority, g.available, drawn[g.grant_id])
            for g in usable
            if g.grant_id in drawn
        )
        invoices.append(replace(invoice, credits=uses))
    return invoices


def _segments(
    partner: str, plan: str, model: str, unit: str, usage: dict[UsageKey, int], boundaries: list[float], book: PriceBook
) -> list[LineItem]:
    """Line items for one model and unit: consecutive buckets with the same unit price form one item."""
    runs: list[tuple[float, float, int, Decimal]] = []
    for index in range(len(boundaries) - 1):
        quantity = usage.get(UsageKey(partner, model, unit, index), 0)
        start, end = boundaries[index], boundaries[index + 1]
        if quantity == 0 and not runs:
            continue
        unit_price = book.price(plan, model, start).unit_price(unit)
        if runs and runs[-1][3] == unit_price:
            first, _, total, _ = runs[-1]
            runs[-1] = (first, end, total + quantity, unit_price)
        else:
            runs.append((start, end, quantity, unit_price))
    return [
        LineItem(model, unit, start, end, quantity, price, quantity * price / UNIT_SIZE[unit])
        for start, end, quantity, price in runs
        if quantity
    ]
