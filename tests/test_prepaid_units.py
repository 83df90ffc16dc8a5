"""Prepaid wallets, credit grants and invoice draws, in-process: both wallets (one process; Redis, real) against
the same cases, the atomicity of the Redis wallet under two clients racing for one balance, and the money rules."""

from __future__ import annotations

import asyncio
import datetime
import time
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
from serving.commerce.prepaid import Prepaid
from serving.commerce.pricebook import PriceBook, PricingError
from serving.commerce.redis_wallet import RedisWallet
from serving.commerce.wallet import GrantUse, MemoryWallet, Reserved, Wallet, WalletGrant
from serving.domain import Caller, Usage
from serving.errors import InsufficientCredit, PermissionDenied, QuotaExceeded
from serving.metering.usage import SpendRow, spend_since
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.quota.admission import Admission
from serving.quota.memory import MemoryQuota
from serving.settings import Admission as AdmissionSettings
from serving.storage.database import Database
from serving.storage.migrations import migrate
from serving.storage.redis_batch import RedisBatch

LEASE_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture(params=["memory", "redis"])
async def wallet(request: pytest.FixtureRequest) -> AsyncIterator[Wallet]:
    if request.param == "memory":
        yield MemoryWallet(LEASE_S)
        return
    batch = RedisBatch(REDIS_URL, timeout_s=2.0)
    yield RedisWallet(batch, lease_s=LEASE_S)
    await batch.close()


def _partner() -> str:
    return f"p_{uuid.uuid4().hex[:12]}"


GRANTS = [WalletGrant("first", 100), WalletGrant("second", 50)]


async def _usage(w: Wallet, p: str) -> dict[str, GrantUse]:
    usage = await w.usage(p)
    assert usage is not None
    return usage


async def test_holds_draw_grants_in_order_and_settle_to_the_actual_cost(wallet: Wallet) -> None:
    w, p = wallet, _partner()
    assert (await w.reserve(p, "h1", 120, GRANTS)).balance == 30  # holds 100 on first, 20 on second
    usage = await _usage(w, p)
    assert (usage["first"].held, usage["second"].held) == (100, 20)
    await w.settle(p, "h1", 90)  # cheaper than held: all from the first grant, the rest released
    usage = await _usage(w, p)
    assert (usage["first"].used, usage["first"].held, usage["second"].held) == (90, 0, 0)
    await w.settle(p, "h1", 90)  # a repeated settlement changes nothing
    assert (await _usage(w, p))["first"].used == 90
    assert (await w.reserve(p, "h2", 60, GRANTS)).ok  # 10 from first, 50 from second
    await w.settle(p, "h2", 60)
    usage = await _usage(w, p)
    assert (usage["first"].used, usage["second"].used) == (100, 50)


async def test_refusal_is_exact_at_the_balance(wallet: Wallet) -> None:
    w, p = wallet, _partner()
    assert not (refused := await w.reserve(p, "big", 151, GRANTS)).ok and refused.balance == 150
    assert (held := await w.reserve(p, "all", 150, GRANTS)).balance == 0 and held.held == 150
    assert (one_more := await w.reserve(p, "one-more", 1, GRANTS)) == Reserved(False, 0, 150, False)
    assert one_more.balance + one_more.held >= 1  # refused only while "all" is in flight: retryable
    assert (await w.reserve(p, "all", 150, GRANTS)).ok  # the same hold sent again (a lost reply): still held
    await w.settle(p, "all", 0)  # refunded whole
    assert (await w.reserve(p, "again", 150, GRANTS)).ok


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_expired_hold_frees_its_money(kind: str) -> None:
    """Its gateway died before settling: past the lease (Redis' own clock for the Redis wallet) the money is free."""
    clock = Clock()
    batch = RedisBatch(REDIS_URL, timeout_s=2.0) if kind == "redis" else None
    # A Redis wallet's lease of 0 ms has ended by its next call (Redis' clock never goes back); the memory one's
    # clock is moved.
    w: Wallet = MemoryWallet(LEASE_S, clock) if batch is None else RedisWallet(batch, lease_s=0)
    p = _partner()
    try:
        assert (await w.reserve(p, "lost", 150, GRANTS)).ok
        clock.now += LEASE_S + 1
        assert (await w.reserve(p, "next", 150, GRANTS)).ok
        await w.settle(p, "lost", 150)  # too late: the lease expired, nothing changes
        await w.settle(p, "next", 40)
        usage = await w.usage(p)
        assert usage is not None and usage["first"] == GrantUse(40, 0)
    finally:
        if batch is not None:
            await batch.close()


async def test_an_empty_wallet_starts_from_the_floors_and_floors_can_be_raised(wallet: Wallet) -> None:
    w, p = wallet, _partner()
    assert await w.usage(p) is None
    floored = [WalletGrant("first", 100, floor=70), WalletGrant("second", 50)]
    assert (await w.reserve(p, "floored", 1, floored)) == Reserved(True, 79, 1, True)
    assert (await w.reserve(p, "again", 1, [WalletGrant("first", 100, floor=90)])).seeded is False  # has state now
    await w.raise_floors(p, [WalletGrant("first", 0, 95), WalletGrant("second", 0, 10)])
    usage = await w.usage(p)
    assert usage is not None and (usage["first"].used, usage["second"].used) == (95, 10)


async def test_two_redis_clients_racing_for_one_balance_never_overspend() -> None:
    """Two gateways' Redis connections, 200 concurrent holds of 7 units on a 500-unit balance: exactly 71 fit."""
    batches = [RedisBatch(REDIS_URL, timeout_s=5.0) for _ in range(2)]
    wallets = [RedisWallet(b, lease_s=LEASE_S) for b in batches]
    p, grants = _partner(), [WalletGrant("g", 300), WalletGrant("h", 200)]
    try:
        results = await asyncio.gather(*(wallets[i % 2].reserve(p, f"r{i}", 7, grants) for i in range(200)))
        assert sum(r.ok for r in results) == 500 // 7
        usage = await wallets[0].usage(p)
        assert usage is not None
        assert usage["g"].held + usage["h"].held == 7 * (500 // 7)
        held = [f"r{i}" for i, r in enumerate(results) if r.ok]
        await asyncio.gather(*(wallets[i % 2].settle(p, h, 5) for i, h in enumerate(held)))
        await asyncio.gather(*(w.reserve(p, "flush", 0, grants) for w in wallets))  # lazy settlements landed
        usage = await wallets[1].usage(p)
        assert usage is not None
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
    assert credits.closed_through(partner.id) == 0.0
    credits.record_close("2026-11", 1_796_083_200.0, [partner.id], [(partner.id, late.id, Decimal("3"))])
    credits.record_close("2026-11", 1_796_083_200.0, [partner.id], [(partner.id, late.id, Decimal("2.5"))])  # again
    credits.record_close("2026-12", 1_798_761_600.0, [partner.id], [])  # paid by the allowance: no draw, still closed
    assert credits.closed_through(partner.id) == 1_798_761_600.0
    credits.record_close("2027-01", 1_801_440_000.0, [partner.id], [(partner.id, late.id, Decimal("1"))])
    assert credits.drawn(partner.id) == {late.id: Decimal("3.5")}
    assert credits.drawn(partner.id, except_period="2027-01") == {late.id: Decimal("2.5")}
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


class _Spend:
    """The ledger's answer for one partner (what ``spend_since`` reads), and the cutoffs it was asked for."""

    def __init__(self, rows: list[SpendRow]) -> None:
        self.rows = rows
        self.asked: list[float] = []

    def __call__(self, partner_id: str, since: float) -> list[SpendRow]:
        self.asked.append(since)
        return self.rows


async def test_a_wallet_that_lost_its_state_resumes_from_the_ledger(tmp_path: Path) -> None:
    """A restarted gateway (an empty in-process wallet): its first prepaid request re-derives the open period's use
    from the ledger, so the balance it had spent is not handed back."""
    store = PartnerStore(Database(str(tmp_path / "serving.db")))
    store.put_plan(Plan("prepaid-units", prepaid=True))
    partner = store.create_partner("resumes", plan="prepaid-units")
    caller = Caller(partner.id, "k", store.plan("prepaid-units"))
    credits = CreditStore(store.db)
    grant = credits.grant(partner.id, "purchased", Decimal("1.00"))
    now = time.time()
    month = time.strftime("%Y-%m", time.gmtime(now))
    # 0.02 per 1k input tokens + 0.0001 per request (minilm-l6 in the shipped book): 0.2000 + 0.0010 = 0.2010
    spend = _Spend([SpendRow(month, "minilm-l6", 10, 10_000, 0)])
    book = PriceBook.load(None)
    prepaid = Prepaid(book, credits, MemoryWallet(LEASE_S), ttl_s=2.0, ledger_spend=spend)
    statement = await prepaid.statement(caller)
    assert (statement["balance"], statement["grants"][0]["used"]) == ("0.799", "0.201")
    hold = await prepaid.hold(caller, "minilm-l6", 1000, 0, "h1")  # 0.0201
    await prepaid.settle(hold, Usage(1000, 0))
    assert (await prepaid.statement(caller))["balance"] == "0.7789"
    with pytest.raises(InsufficientCredit) as refused:
        await prepaid.hold(caller, "minilm-l6", 40_000, 0, "h2")  # 0.8001
    assert (refused.value.balance, refused.value.required) == ("0.7789", "0.8001")
    assert spend.asked == [0.0]  # seeded once per process, from the start (no period closed yet)
    with pytest.raises(PermissionDenied, match="no price"):  # the shipped book prices no "noop"
        await prepaid.hold(caller, "noop", 1, 0, "h3")
    credits.record_close("2026-01", 1_767_225_600.0, [partner.id], [(partner.id, grant.id, Decimal("0.25"))])
    again = Prepaid(book, credits, MemoryWallet(LEASE_S), ttl_s=2.0, ledger_spend=spend)
    # After a close: the closed draw, plus the ledger's use since that period's end.
    assert (await again.statement(caller))["grants"][0]["used"] == "0.451"
    assert spend.asked[-1] == 1_767_225_600.0
    store.close()


def test_spend_since_sums_the_ledger_per_month_and_model(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "ledger.db"))
    migrate(db)
    rows = [
        ("p1", "r1", "minilm-l6", 5, 0, 100.0, "1970-01-01"),
        ("p1", "r2", "minilm-l6", 7, 0, 200.0, "1970-01-01"),
        ("p1", "r3", "smollm2-135m-instruct", 3, 9, 300.0, "1970-01-01"),
        ("p2", "r4", "minilm-l6", 50, 0, 300.0, "1970-01-01"),
    ]
    for partner, request, model, input_tokens, output_tokens, finished, day in rows:
        db.execute(
            "INSERT INTO usage_records (partner_id, request_id, key_id, model, operation, input_tokens, output_tokens,"
            " status, queue_ms, latency_ms, started_at, finished_at, day) VALUES (?, ?, 'k', ?, 'x', ?, ?, 'ok', 0, 0,"
            " ?, ?, ?)",
            (partner, request, model, input_tokens, output_tokens, finished, finished, day),
        )
    found = sorted(spend_since(db, "p1", 150.0), key=lambda r: r.model)
    assert found == [
        SpendRow("1970-01", "minilm-l6", 1, 7, 0),
        SpendRow("1970-01", "smollm2-135m-instruct", 1, 3, 9),
    ]
    db.close()


class _Setup:
    """Admission over the in-process quota and wallet, a prepaid partner with a 1.00 grant on the shipped book
    (minilm-l6: 0.02 per 1,000 input tokens + 0.0001 per request)."""

    def __init__(self, tmp_path: Path, plan: Plan) -> None:
        self.store = PartnerStore(Database(str(tmp_path / "serving.db")))
        self.store.put_plan(plan)
        partner = self.store.create_partner("admitted", plan=plan.name)
        self.caller = Caller(partner.id, "k", self.store.plan(plan.name))
        CreditStore(self.store.db).grant(partner.id, "purchased", Decimal("1.00"))
        self.prepaid = Prepaid(PriceBook.load(None), CreditStore(self.store.db), MemoryWallet(LEASE_S), ttl_s=2.0)
        self.admission = Admission(MemoryQuota(), [], AdmissionSettings(), prepaid=self.prepaid)

    async def used(self) -> str:
        statement = await self.prepaid.statement(self.caller)
        return str(statement["grants"][0]["used"])


async def test_admission_draws_only_what_ran_and_gives_back_what_a_refusal_took(tmp_path: Path) -> None:
    setup = _Setup(tmp_path, Plan("prepaid-adm", prepaid=True, max_concurrent=1))
    admission, caller = setup.admission, setup.caller
    first = await admission.reserve(caller, "minilm-l6", 1000)  # holds 0.0201
    assert first.hold is not None and first.hold.units == 20_100_000
    # The quota refuses the next one (concurrency 1): its hold, taken in the same step, is given back.
    with pytest.raises(QuotaExceeded) as refused:
        await admission.reserve(caller, "minilm-l6", 1000)
    assert refused.value.param == "concurrency"
    admission.settle_soon(first, Usage(), admitted=False)  # shed by the fair queue: it never ran, draws nothing
    await admission.drain()
    assert await setup.used() == "0.00"
    ran = await admission.reserve(caller, "minilm-l6", 1000)
    admission.settle_soon(ran, Usage(500, 0))  # ran, on fewer tokens than reserved: 0.0101
    await admission.drain()
    assert await setup.used() == "0.0101"
    with pytest.raises(InsufficientCredit):  # more than the balance: the quota reservation is given back
        await admission.reserve(caller, "minilm-l6", 60_000)
    await admission.drain()
    assert (await admission.reserve(caller, "minilm-l6", 1)).hold is not None  # the concurrency slot is free
    setup.store.close()


async def test_a_refusal_while_requests_in_flight_hold_the_balance_is_retryable(tmp_path: Path) -> None:
    setup = _Setup(tmp_path, Plan("prepaid-busy", prepaid=True))
    held = await setup.admission.reserve(setup.caller, "minilm-l6", 40_000)  # 0.8001 of 1.00 held
    with pytest.raises(QuotaExceeded) as busy:
        await setup.admission.reserve(setup.caller, "minilm-l6", 20_000)  # 0.4001: fits once the first settles
    assert not isinstance(busy.value, InsufficientCredit) and busy.value.param == "balance_held"
    assert busy.value.retry_after_s == 1.0 and "held by your requests in flight" in busy.value.message
    setup.admission.settle_soon(held, Usage(1000, 0))
    await setup.admission.drain()
    assert (await setup.admission.reserve(setup.caller, "minilm-l6", 20_000)).hold is not None
    setup.store.close()


def _at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


async def test_floors_draw_each_month_from_that_months_allowance_and_grants(tmp_path: Path) -> None:
    """Use since the last close, re-derived month by month: the month's allowance first, then the grants usable in
    that month (an expired promotion took November's, not December's); a later close raises a wallet with state."""
    book = PriceBook.parse(
        'currency = "USD"\n[[terms]]\nplan = "monthly"\neffective_from = 2026-01-01T00:00:00Z\n'
        'monthly_allowance = "0.10"\n[[price]]\nplan = "*"\nmodel = "*"\neffective_from = 2026-01-01T00:00:00Z\n'
        'per_request = "0.01"\n'
    )
    store = PartnerStore(Database(str(tmp_path / "serving.db")))
    store.put_plan(Plan("monthly", prepaid=True))
    partner = store.create_partner("months", plan="monthly")
    caller = Caller(partner.id, "k", store.plan("monthly"))
    credits = CreditStore(store.db)
    october = _at("2026-10-01T00:00:00")
    promo = credits.grant(
        partner.id, "promotional", Decimal("1.00"), priority=1, expires_at=_at("2026-11-15T00:00:00"), now=october
    )
    paid = credits.grant(partner.id, "purchased", Decimal("5.00"), priority=10, now=october)
    credits.record_close("2026-10", _at("2026-11-01T00:00:00"), [partner.id], [])  # paid by October's allowance
    spend = _Spend([SpendRow("2026-11", "minilm-l6", 50, 0, 0), SpendRow("2026-12", "minilm-l6", 30, 0, 0)])
    wallet = MemoryWallet(LEASE_S)
    prepaid = Prepaid(book, credits, wallet, ttl_s=0.0, ledger_spend=spend, clock=lambda: _at("2026-12-15T00:00:00"))
    statement = await prepaid.statement(caller)
    used = {g["id"]: (g["used"], g["status"]) for g in statement["grants"]}
    assert used == {"allowance-2026-12": ("0.10", "active"), promo.id: ("0.40", "expired"), paid.id: ("0.20", "active")}
    assert statement["balance"] == "4.80" and spend.asked == [_at("2026-11-01T00:00:00")]
    hold = await prepaid.hold(caller, "minilm-l6", 1, 0, "h1")  # the wallet starts from those floors
    await prepaid.settle(hold, Usage(1, 0))
    assert (await prepaid.statement(caller))["balance"] == "4.79"
    # November closes: its invoice drew 1.20 from the paid grant, more than the wallet saw (the partner was postpaid
    # for a while, say). The wallet raises its use to the closed draws plus December's ledger use (0.21 after the
    # allowance): 1.41.
    credits.record_close("2026-11", _at("2026-12-01T00:00:00"), [partner.id], [(partner.id, paid.id, Decimal("1.20"))])
    spend.rows = [SpendRow("2026-12", "minilm-l6", 31, 0, 0)]
    assert (await prepaid.hold(caller, "minilm-l6", 1, 0, "h2")).units == 10_000_000
    statement = await prepaid.statement(caller)
    assert {g["id"]: g["used"] for g in statement["grants"]}[paid.id] == "1.41"
    assert statement["balance"] == "3.58" and statement["held"] == "0.01"
    store.close()
