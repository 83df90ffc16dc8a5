"""Prepaid wallets, credit grants and invoice draws, in-process: both wallets (one process; Redis, real) against
the same cases, the atomicity of the Redis wallet under two clients racing for one balance, and the money rules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import REDIS_URL

from billing.invoices import GrantBalance, build_invoices
from billing.periods import Period
from serving.commerce.credits import CreditError, CreditStore, allocate
from serving.commerce.money import MoneyError, from_units, parse_amount, to_units
from serving.commerce.pricebook import PriceBook, PricingError
from serving.commerce.redis_wallet import RedisWallet
from serving.commerce.wallet import MemoryWallet, Wallet, WalletGrant
from serving.partners.store import PartnerStore
from serving.storage.database import Database
from serving.storage.redis_batch import RedisBatch

LEASE_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture(params=["memory", "redis"])
async def wallet(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Wallet, Clock]]:
    clock = Clock()
    if request.param == "memory":
        yield MemoryWallet(LEASE_S, clock), clock
        return
    batch = RedisBatch(REDIS_URL, timeout_s=2.0)
    yield RedisWallet(batch, lease_s=LEASE_S, clock=clock), clock
    await batch.close()


def _partner() -> str:
    return f"p_{uuid.uuid4().hex[:12]}"


GRANTS = [WalletGrant("first", 100), WalletGrant("second", 50)]


async def test_holds_draw_grants_in_order_and_settle_to_the_actual_cost(wallet: tuple[Wallet, Clock]) -> None:
    w, _ = wallet
    p = _partner()
    assert (await w.reserve(p, "h1", 120, GRANTS)).balance == 30  # holds 100 on first, 20 on second
    usage = await w.usage(p)
    assert (usage["first"].held, usage["second"].held) == (100, 20)
    await w.settle(p, "h1", 90)  # cheaper than held: all from the first grant, the rest released
    usage = await w.usage(p)
    assert (usage["first"].used, usage["first"].held, usage["second"].held) == (90, 0, 0)
    await w.settle(p, "h1", 90)  # a repeated settlement changes nothing
    assert (await w.usage(p))["first"].used == 90
    assert (await w.reserve(p, "h2", 60, GRANTS)).ok  # 10 from first, 50 from second
    await w.settle(p, "h2", 60)
    usage = await w.usage(p)
    assert (usage["first"].used, usage["second"].used) == (100, 50)


async def test_refusal_is_exact_at_the_balance(wallet: tuple[Wallet, Clock]) -> None:
    w, _ = wallet
    p = _partner()
    assert not (refused := await w.reserve(p, "big", 151, GRANTS)).ok and refused.balance == 150
    assert (await w.reserve(p, "all", 150, GRANTS)).balance == 0
    assert not (await w.reserve(p, "one-more", 1, GRANTS)).ok
    assert (await w.reserve(p, "all", 150, GRANTS)).ok  # the same hold sent again (a lost reply): still held
    await w.settle(p, "all", 0)  # refunded whole
    assert (await w.reserve(p, "again", 150, GRANTS)).ok


async def test_an_expired_hold_frees_its_money_and_floors_count_closed_draws(wallet: tuple[Wallet, Clock]) -> None:
    w, clock = wallet
    p = _partner()
    assert (await w.reserve(p, "lost", 150, GRANTS)).ok
    clock.now += LEASE_S + 1  # its gateway died before settling
    assert (await w.reserve(p, "next", 150, GRANTS)).ok
    await w.settle(p, "lost", 150)  # too late: the lease expired, nothing changes
    await w.settle(p, "next", 0)
    # A closed invoice drew 70 from the first grant: the wallet never counts less use than that.
    floored = [WalletGrant("first", 100, floor=70), WalletGrant("second", 50)]
    assert (await w.reserve(p, "floored", 1, floored)).balance == 79
    assert (await w.usage(p))["first"].used == 70


async def test_two_redis_clients_racing_for_one_balance_never_overspend() -> None:
    """Two gateways' Redis connections, 200 concurrent holds of 7 units on a 500-unit balance: exactly 71 fit."""
    batches = [RedisBatch(REDIS_URL, timeout_s=5.0) for _ in range(2)]
    wallets = [RedisWallet(b, lease_s=LEASE_S) for b in batches]
    p, grants = _partner(), [WalletGrant("g", 300), WalletGrant("h", 200)]
    try:
        results = await asyncio.gather(*(wallets[i % 2].reserve(p, f"r{i}", 7, grants) for i in range(200)))
        assert sum(r.ok for r in results) == 500 // 7
        usage = await wallets[0].usage(p)
        assert usage["g"].held + usage["h"].held == 7 * (500 // 7)
        held = [f"r{i}" for i, r in enumerate(results) if r.ok]
        await asyncio.gather(*(wallets[i % 2].settle(p, h, 5) for i, h in enumerate(held)))
        await asyncio.gather(*(w.reserve(p, "flush", 0, grants) for w in wallets))  # lazy settlements landed
        usage = await wallets[1].usage(p)
        assert usage["g"].used + usage["h"].used == 5 * len(held) and usage["g"].held + usage["h"].held == 0
    finally:
        for batch in batches:
            await batch.close()


def test_money_units_are_exact_or_refused() -> None:
    assert to_units(Decimal("0.000000001")) == 1 and from_units(1) == Decimal("1E-9")
    with pytest.raises(MoneyError):
        to_units(Decimal("0.0000000001"))
    assert parse_amount("25.00") == Decimal("25.00")
    for bad in ("-1", "0", "abc", "1e400", "0.0000000001"):
        with pytest.raises(MoneyError):
            parse_amount(bad)
    with pytest.raises(MoneyError):
        parse_amount(1.5)


def test_price_book_costs_are_exact_units_and_too_fine_prices_are_refused() -> None:
    book = PriceBook.load(None)
    price = book.price("standard", "smollm2-135m-instruct", 1.8e9)
    assert price.cost(31, 16) == Decimal("0.0031") + Decimal("0.0048") + Decimal("0.0005")
    assert price.cost_units(31, 16) == 8_400_000
    too_fine = (
        'currency = "USD"\n[[price]]\nplan = "*"\nmodel = "*"\neffective_from = 2026-01-01T00:00:00Z\n'
        'input_per_1k = "0.0000001"\n'
    )
    with pytest.raises(PricingError, match="finer than 1e-9"):
        PriceBook.parse(too_fine)


def test_allocate_draws_in_order_as_far_as_each_goes() -> None:
    grants = [("a", Decimal("1.00")), ("b", Decimal("0.50")), ("c", Decimal("5"))]
    assert allocate(grants, Decimal("1.20")) == [("a", Decimal("1.00")), ("b", Decimal("0.20"))]
    assert allocate(grants, Decimal("9")) == [("a", Decimal("1.00")), ("b", Decimal("0.50")), ("c", Decimal("5"))]
    assert allocate(grants, Decimal("0")) == []


def test_credit_grants_are_listed_in_draw_order_and_draws_are_idempotent(tmp_path: Path) -> None:
    store = PartnerStore(Database(str(tmp_path / "serving.db")))
    credits = CreditStore(store.db)
    partner = store.create_partner("grants")
    now = 1_800_000_000.0
    late = credits.grant(partner.id, "purchased", Decimal("10"), priority=50, now=now)
    soon = credits.grant(partner.id, "promotional", Decimal("5"), priority=50, expires_at=now + 10, now=now)
    first = credits.grant(partner.id, "promotional", Decimal("1"), priority=1, now=now + 1)
    assert [g.id for g in credits.grants(partner.id)] == [first.id, soon.id, late.id]
    with pytest.raises(CreditError):
        credits.grant(partner.id, "gift", Decimal("1"))
    with pytest.raises(CreditError):
        credits.grant(partner.id, "purchased", Decimal("1"), expires_at=now - 1, now=now)
    credits.record_draws("2026-11", [(partner.id, late.id, Decimal("2.5"))])
    credits.record_draws("2026-11", [(partner.id, late.id, Decimal("2.5"))])  # a retried close
    credits.record_draws("2026-12", [(partner.id, late.id, Decimal("1"))])
    assert credits.drawn(partner.id) == {late.id: Decimal("3.5")}
    assert credits.drawn(partner.id, except_period="2026-12") == {late.id: Decimal("2.5")}
    store.close()


def test_invoices_draw_grants_after_the_allowance_and_show_each_use() -> None:
    from billing.counters import UsageKey

    book = PriceBook.load(None)  # standard: 5.00 allowance; minilm-l6 0.02 per 1k input + 0.0001 per request
    period = Period.parse("2026-11")
    usage = {
        UsageKey("p1", "minilm-l6", "input_tokens", 0): 300_000,  # 6.00
        UsageKey("p1", "minilm-l6", "requests", 0): 10_000,  # 1.00
    }
    grants = {
        "p1": [
            GrantBalance("promo", "promotional", 1, Decimal("1.50")),
            GrantBalance("paid", "purchased", 5, Decimal("3")),
        ]
    }
    boundaries = [period.start, period.end]
    [invoice] = build_invoices(period, usage, boundaries, {"p1": "standard"}, book, "standard", (), grants)
    assert invoice.subtotal == Decimal("7.00") and invoice.credit == Decimal("5.00")
    assert [(u.grant_id, u.applied) for u in invoice.credits] == [("promo", Decimal("1.50")), ("paid", Decimal("0.50"))]
    assert invoice.total == Decimal("0.00")
    doc = invoice.as_dict()
    assert doc["credits_applied"] == "2.00" and doc["credits"][1]["remaining"] == "2.50"
    assert "p1,2026-11,credit_grant,promo,,,,,,-1.50" in invoice.to_csv()
