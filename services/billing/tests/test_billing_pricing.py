"""Pricing and invoices: price changes split line items, allowance, commitment, exact money, one rounding."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.counters import UsageKey
from billing.invoices import build_invoices
from billing.periods import Period, PeriodError, previous_month
from serving.commerce.pricebook import PriceBook, PricingError

BOOK = """
currency = "EUR"
[[terms]]
plan = "standard"
effective_from = 2026-01-01T00:00:00Z
monthly_allowance = "1.00"
[[terms]]
plan = "big"
effective_from = 2026-01-01T00:00:00Z
minimum_commitment = "100"
[[price]]
model = "*"
effective_from = 2026-01-01T00:00:00Z
input_per_1k = "0.5"
[[price]]
model = "emb"
effective_from = 2026-01-01T00:00:00Z
input_per_1k = "0.0200"
output_per_1k = "0"
per_request = "0.0001"
[[price]]
model = "emb"
effective_from = 2026-11-15T00:00:00Z
input_per_1k = "0.0300"
per_request = "0.0001"
[[price]]
plan = "big"
model = "emb"
effective_from = 2026-01-01T00:00:00Z
input_per_1k = "0.0100"
"""


def ts(day: int) -> float:
    return datetime(2026, 11, day, tzinfo=UTC).timestamp()


def test_price_change_mid_period_splits_line_items_and_the_allowance_applies() -> None:
    book = PriceBook.parse(BOOK)
    period = Period.parse("2026-11")
    boundaries = [period.start, *book.changes(period.start, period.end), period.end]
    assert boundaries == [period.start, ts(15), period.end]
    usage = {
        UsageKey("p1", "emb", "input_tokens", 0): 12_345,
        UsageKey("p1", "emb", "input_tokens", 1): 50_001,
        UsageKey("p1", "emb", "requests", 0): 7,
        UsageKey("p1", "emb", "requests", 1): 3,
    }
    [invoice] = build_invoices(period, usage, boundaries, {"p1": "standard"}, book, "standard")
    lines = [(i.unit, i.quantity, i.unit_price, i.amount) for i in invoice.lines]
    assert lines == [
        ("input_tokens", 12_345, Decimal("0.0200"), Decimal("0.24690")),
        ("input_tokens", 50_001, Decimal("0.0300"), Decimal("1.50003")),
        ("requests", 10, Decimal("0.0001"), Decimal("0.0010")),
    ]
    assert invoice.lines[0].end == ts(15) and invoice.lines[1].start == ts(15)
    assert invoice.subtotal == Decimal("1.74793")
    assert invoice.credit == Decimal("1.00")
    assert invoice.total == Decimal("0.75")  # 0.74793 rounded half-even to the cent
    assert invoice.as_dict()["allowance_credit"] == "1.00" and invoice.as_dict()["total"] == "0.75"


def test_allowance_never_goes_negative_and_commitment_tops_up() -> None:
    book = PriceBook.parse(BOOK)
    period = Period.parse("2026-11")
    usage = {UsageKey("small", "emb", "input_tokens", 0): 1000, UsageKey("whale", "emb", "input_tokens", 0): 1000}
    invoices = build_invoices(
        period, usage, [period.start, period.end], {"small": "standard", "whale": "big", "idle": "big"}, book, "x"
    )
    by = {i.partner: i for i in invoices}
    assert by["small"].credit == Decimal("0.02") and by["small"].total == Decimal("0.00")
    assert by["whale"].lines[0].unit_price == Decimal("0.0100")  # the plan-specific price wins over "*"
    assert by["whale"].topup == Decimal("99.99") and by["whale"].total == Decimal("100.00")
    assert by["idle"].lines == [] and by["idle"].total == Decimal("100.00")  # monthly: commitment without usage


def test_ranges_on_demand_get_allowance_and_commitment_pro_rated() -> None:
    book = PriceBook.parse(BOOK)
    period = Period.parse("2026-11-02T00:00:00Z..2026-11-05T00:00:00Z")  # 3 of November's 30 days
    assert period.month_share() == Decimal("0.1")
    usage = {UsageKey("p", "other", "input_tokens", 0): 300, UsageKey("w", "emb", "input_tokens", 0): 1000}
    invoices = build_invoices(period, usage, [period.start, period.end], {"idle": "big", "w": "big"}, book, "standard")
    by = {i.partner: i for i in invoices}
    assert set(by) == {"p", "w"}  # a range invoices partners with usage only
    assert (by["p"].subtotal, by["p"].credit, by["p"].total) == (Decimal("0.15"), Decimal("0.10"), Decimal("0.05"))
    assert by["w"].topup == Decimal("9.99") and by["w"].total == Decimal("10.00")


def test_half_even_rounding_of_the_total() -> None:
    book = PriceBook.parse(BOOK)
    period = Period.parse("2026-11-02T00:00:00Z..2026-11-03T00:00:00Z")
    for tokens, total in ((10, "0.00"), (30, "0.02"), (50, "0.02"), (70, "0.04")):  # 0.005, 0.015, 0.025, 0.035
        usage = {UsageKey("p", "other", "input_tokens", 0): tokens}
        [invoice] = build_invoices(period, usage, [period.start, period.end], {}, book, "no-terms")
        assert str(invoice.total) == total


def test_json_and_csv_are_deterministic() -> None:
    book = PriceBook.parse(BOOK)
    period = Period.parse("2026-11")
    usage = {UsageKey("p1", "emb", "input_tokens", 1): 999, UsageKey("p1", "emb", "requests", 1): 2}

    def render() -> tuple[str, str]:
        [invoice] = build_invoices(period, dict(usage), [period.start, ts(15), period.end], {}, book, "standard")
        return invoice.to_json(), invoice.to_csv()

    assert render() == render()
    json_text, csv_text = render()
    assert '"total": "0.00"' in json_text
    assert csv_text.splitlines()[0] == "partner,period,kind,model,unit,from,to,quantity,unit_price,amount"
    assert "p1,2026-11,line,emb,input_tokens,2026-11-15T00:00:00Z,2026-12-01T00:00:00Z,999,0.03,0.02997" in csv_text


@pytest.mark.parametrize(
    "bad",
    [
        '[[price]]\nmodel = "m"\neffective_from = 2026-01-01T00:00:00Z\ninput_per_1k = 0.1\n',  # a float
        '[[price]]\nmodel = "m"\neffective_from = 2026-01-01\ninput_per_1k = "0.1"\n',  # no time zone
        '[[price]]\nmodel = "m"\neffective_from = 2026-01-01T00:00:00Z\ninput_per_1k = "-1"\n',
        "[[price]\n",
    ],
)
def test_bad_price_books_are_refused(bad: str) -> None:
    with pytest.raises(PricingError):
        PriceBook.parse(bad)


def test_usage_without_a_price_is_an_error_not_a_free_ride() -> None:
    book = PriceBook.parse('[[price]]\nmodel = "m"\neffective_from = 2026-01-01T00:00:00Z\n')
    period = Period.parse("2026-11")
    with pytest.raises(PricingError):
        build_invoices(period, {UsageKey("p", "other", "requests", 0): 1}, [period.start, period.end], {}, book, "s")


def test_the_shipped_price_book_loads() -> None:
    book = PriceBook.load(None)
    assert book.price("standard", "minilm-l6", ts(20)).input_per_1k == Decimal("0.0200")


def test_periods() -> None:
    assert Period.parse("2026-12").end == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    custom = Period.parse("2026-11-25T12:00:00+00:00..2026-11-25T12:30:00.250Z")
    assert custom.id == "2026-11-25T12:00:00Z..2026-11-25T12:30:00.250000Z" and not custom.monthly
    for bad in ("2026-13", "yesterday", "2026-11-25T13:00:00Z..2026-11-25T12:00:00Z"):
        with pytest.raises(PeriodError):
            Period.parse(bad)


def test_previous_month_crosses_the_year() -> None:
    assert previous_month(datetime(2026, 12, 1, 0, 5, tzinfo=UTC)) == "2026-11"
    assert previous_month(datetime(2027, 1, 1, 0, 0, tzinfo=UTC)) == "2026-12"
    assert Period.parse(previous_month(datetime(2027, 1, 15, tzinfo=UTC))).monthly


def test_a_model_version_is_invoiced_per_version_at_its_base_price_unless_priced_itself() -> None:
    """Usage is keyed by the concrete model (``emb@2`` is a version of ``emb``): one line item per version; a version
    without a price of its own costs what its base does, and a price of its own wins."""
    book = PriceBook.parse(
        BOOK + '[[price]]\nmodel = "emb@3"\neffective_from = 2026-01-01T00:00:00Z\ninput_per_1k = "1"\n'
    )
    assert book.price("standard", "emb@2", ts(1)).input_per_1k == Decimal("0.0200")  # emb's
    assert book.price("big", "emb@2", ts(1)).input_per_1k == Decimal("0.0100")  # emb's for plan big
    assert book.price("standard", "emb@3", ts(1)).input_per_1k == Decimal("1")  # its own
    assert book.price("standard", "other@1", ts(1)).input_per_1k == Decimal("0.5")  # "*", as for "other"
    period = Period.parse("2026-11")
    usage = {UsageKey("p1", "emb", "input_tokens", 0): 1000, UsageKey("p1", "emb@2", "input_tokens", 0): 2000}
    [invoice] = build_invoices(period, usage, [period.start, ts(15), period.end], {"p1": "standard"}, book, "standard")
    assert [(i.model, i.quantity, i.amount) for i in invoice.lines] == [
        ("emb", 1000, Decimal("0.0200")),
        ("emb@2", 2000, Decimal("0.0400")),
    ]
